"""Time and peak memory of ``python -m search_lib.data.prepare`` on synthetic sources of the real sizes.

    python -m benchmarks.bench_prepare [--imagenet_images 6400] [--workers 0] [--keep DIR] [--json]

1. CIFAR-FS from a CIFAR-100 of 60,000 images (500 + 100 per class, random pixels, the real names): the whole
   command, as a user runs it (reading CIFAR-100, writing the four files, the check with its MD5s).
2. miniImageNet from an ImageNet folder of photograph-like JPEGs of 300-500 x 300-500 pixels (ImageNet's are
   about 400 x 350, 110 kB on average; these about 105 kB): 100 synsets, ``--imagenet_images`` / 100 images
   each, with lists of 64 / 16 / 20 classes (the published sizes) naming them all. Its images per second give
   the estimates for the real miniImageNet (60,000 images) and tieredImageNet (779,165), whose time is decoding.

Each preparation runs as its own process; its wall time, CPU time and peak resident memory (``wait4``) are
reported, the interpreter's own (torch is imported by the command-line plumbing) included. The sources are
written to a temporary folder (``--keep DIR`` keeps them, and a second run reuses them) and are not timed.
Absolute numbers depend on the machine, its disk and its load; on a busy machine the CPU times say more.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from search_lib.data.synthetic_sources import write_fake_cifar100, write_fake_imagenet, write_mini_lists

REAL_MINI, REAL_TIERED = 60_000, 779_165


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagenet_images", type=int, default=6400, help="JPEGs of the synthetic ImageNet (100 synsets)")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (0: one per CPU)")
    p.add_argument("--keep", default=None, help="write the sources and outputs here and keep them")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    return p


def run_prepare(argv: list[str]) -> dict:
    """One preparation in its own process, into an empty --out: wall and CPU seconds, peak resident MiB."""
    shutil.rmtree(argv[argv.index("--out") + 1], ignore_errors=True)  # a prepared folder would be reported as done
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "search_lib.data.prepare", *argv, "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prepare failed: {proc.stderr.read().strip()}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_mib": round(usage.ru_maxrss / 1024)}


def mini_sources(root: Path, images: int) -> Path:
    per = max(1, images // 100)
    synsets = [f"n{90000000 + i:08d}" for i in range(100)]
    if not all(len(list((root / "train" / s).glob("*.JPEG"))) == per for s in synsets):  # --keep: made once
        write_fake_imagenet(root / "train", {s: per for s in synsets}, sizes=(300, 500), photo=True)
    parts = {"train": synsets[:64], "val": synsets[64:80], "test": synsets[80:]}
    return write_mini_lists(root / "lists", {split: {s: list(range(1, per + 1)) for s in names}
                                             for split, names in parts.items()})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        source = root / "cifar" / "cifar-100-python"
        if not source.is_dir():  # --keep: made once
            write_fake_cifar100(root / "cifar", train_per_class=500, test_per_class=100)
        cifar = run_prepare(["--dataset", "CIFAR-FS", "--source", str(source), "--out", str(root / "CIFAR-FS")])
        lists = mini_sources(root / "imagenet", args.imagenet_images)
        n = (args.imagenet_images // 100) * 100
        mini = run_prepare(["--dataset", "miniImageNet", "--source", str(root / "imagenet" / "train"), "--splits",
                            str(lists), "--out", str(root / "miniImageNet"), "--workers", str(args.workers)])
    rate, cpu_ms = n / mini["wall_s"], 1e3 * mini["cpu_s"] / n  # CPU time: what the load of others changes least
    result = {"cpus": len(os.sched_getaffinity(0)), "load": round(os.getloadavg()[0], 1), "cifar_fs_60000": cifar,
              "mini": {**mini, "images": n, "images_per_s": round(rate, 1), "cpu_ms_per_image": round(cpu_ms, 2),
                       "estimate_real_mini_min": round(REAL_MINI / rate / 60, 1),
                       "estimate_real_tiered_min": round(REAL_TIERED / rate / 60, 1),
                       "estimate_real_mini_cpu_min": round(REAL_MINI * cpu_ms / 6e4, 1),
                       "estimate_real_tiered_cpu_min": round(REAL_TIERED * cpu_ms / 6e4, 1)}}
    if args.json:
        print(json.dumps(result))
        return 0
    m = result["mini"]
    print(f"{result['cpus']} CPU(s), load {result['load']}")
    print(f"  CIFAR-FS from 60,000 CIFAR-100 images: {cifar['wall_s']} s ({cifar['cpu_s']} s CPU), peak "
          f"{cifar['peak_mib']} MiB")
    print(f"  miniImageNet from {n} JPEGs: {mini['wall_s']} s ({rate:.0f} images/s; {mini['cpu_s']} s CPU, "
          f"{cpu_ms:.2f} ms per image), peak {mini['peak_mib']} MiB")
    print(f"  estimates at that rate: miniImageNet (60,000 images) {m['estimate_real_mini_min']} min, "
          f"tieredImageNet (779,165 images) {m['estimate_real_tiered_min']} min; in CPU time (one core): "
          f"{m['estimate_real_mini_cpu_min']} and {m['estimate_real_tiered_cpu_min']} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
