"""Two runs sharing one box against one alone: the demo's search and a training epoch (docs/benchmarks.md).

    python -m benchmarks.bench_shared [--what search,train] [--extra "--threads 2"] [--repo OTHER_CHECKOUT] [--json]

Each measurement runs the real command line in subprocesses: first one alone, then two copies started
together, and prints their wall times (for the training, the time of its second epoch, read from
metrics.jsonl: the first warms up), the side-by-side / alone ratio, and the resident high-water mark of
every process (``os.wait4``). The ratio is what matters: sharing 2 cores fairly between two runs gives about
2x; OpenMP threads spinning against each other gave 4.3x before the thread counts were tuned. ``--extra``
appends flags to every command (``--threads 2`` shows a fixed count); ``--repo`` runs another checkout's
scripts (with its own ``.venv`` when it has one), e.g. an earlier version for the numbers before a change.
The machine's other load changes every number: run it on a quiet machine, or compare ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_SEARCH = ["--dataset", "MetaDigits", "--rand_seed", "0", "--ntk_channels", "4", "--image_size", "16",
               "--batch_size", "2", "--repeat", "1", "--prune_number", "2", "--regions_batch_size", "300"]
DEMO_GENOTYPE = ("Genotype(normal=[[('conv_3x3', 0), ('avg_pool_3x3BN', 1)], [('conv_1x5_5x1', 0), "
                 "('conv_1x5_5x1', 1)], [('conv_1x5_5x1', 0), ('dil_conv_3x3', 3)]], normal_concat=[2, 3, 4], "
                 "reduce=[[('avg_pool_3x3BN', 0), ('skip_connect', 1)], [('max_pool_3x3BN', 0), ('conv_1x5_5x1', 1)], "
                 "[('conv_3x3', 0), ('conv_1x5_5x1', 2)]], reduce_concat=[2, 3, 4])")  # the demo's search result
DEMO_TRAIN = ["--genotype", DEMO_GENOTYPE, "--dataset", "Digits", "--init_channels", "8", "--layers", "5",
              "--epochs", "2", "--batch_size", "64", "--learning_rate", "0.05", "--n_test_runs", "2",
              "--n_shots", "1", "--eval_splits", "test", "--num_workers", "0", "--no-progress", "--seed", "0"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--what", default="search,train", help="search (the demo's), train (its training's epoch)")
    p.add_argument("--extra", default="", help="flags appended to every command, e.g. '--threads 2'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repo", default=str(REPO), help="the checkout whose scripts run (default: this one)")
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    return p


def _command(repo: Path, what: str, save_dir: Path, extra: list[str], device: str) -> list[str]:
    python = repo / ".venv" / "bin" / "python"
    python = str(python) if repo != REPO and python.exists() else sys.executable
    if what == "search":
        return [python, str(repo / "prune_metantknas.py"), *DEMO_SEARCH, "--device", device,
                "--save_dir", str(save_dir), *extra]
    return [python, str(repo / "eval_searched_arch.py"), *DEMO_TRAIN, "--device", device,
            "--save_dir", str(save_dir), *extra]


def _start(cmd: list[str]) -> tuple[subprocess.Popen, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "METANTKNAS_THREADS")}
    return subprocess.Popen(cmd, cwd=Path(cmd[1]).parent, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True), time.monotonic()


def _finish(proc: subprocess.Popen, t0: float, what: str, save_dir: Path) -> dict:
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: the benchmark's command failed: {err.strip().splitlines()[-1:]}")
    out = {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    if what == "train":  # the second epoch: the first one warms up (allocator, tuner probes)
        epochs = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
        out["epoch_s"] = round(epochs[-1]["time"], 2)
    return out


def measure(repo: Path, what: str, extra: list[str], device: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_shared_") as tmp:
        root = Path(tmp)
        alone = _finish(*_start(_command(repo, what, root / "alone", extra, device)), what, root / "alone")
        started = [_start(_command(repo, what, root / f"side{i}", extra, device)) for i in range(2)]
        side = [_finish(p, t0, what, root / f"side{i}") for i, (p, t0) in enumerate(started)]
    key = "epoch_s" if what == "train" else "wall_s"
    return {"what": what, "key": key, "alone": alone, "side_by_side": side,
            "ratio": round(max(s[key] for s in side) / alone[key], 2)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    extra = shlex.split(args.extra)
    repo = Path(args.repo).resolve()
    rows = [measure(repo, w.strip(), extra, args.device) for w in args.what.split(",") if w.strip()]
    if args.json:
        print(json.dumps({"repo": str(repo), "extra": args.extra, "cpus": len(os.sched_getaffinity(0)),
                          "load_after": os.getloadavg()[0], "rows": rows}))
        return 0
    for r in rows:
        side = " / ".join(f"{s[r['key']]:.1f} s" for s in r["side_by_side"])
        peaks = ", ".join(f"{s['peak_rss_mb']:.0f}" for s in [r["alone"], *r["side_by_side"]])
        print(f"{r['what']:6s} ({r['key']}): alone {r['alone'][r['key']]:.1f} s, side by side {side}: "
              f"{r['ratio']:.2f}x   (peak resident MB: {peaks})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
