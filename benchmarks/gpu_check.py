"""One bounded check of the CUDA paths on a GPU machine (`make gpu-check`; not part of `make test`).

    python -m benchmarks.gpu_check [--out DIR] [--steps tests,search,train,genotype] [--total_s 540]

Each step runs as its own process with its own time limit, and the whole never takes more than ``--total_s``
(default 540 s: about 8 minutes of steps and the synthetic data, 9 at most):

    tests     ``pytest -m gpu``: tests/test_gpu.py (fused inference, a bf16 training epoch, an fp16 resume,
              DeviceBatches, the memory meter and budget, the few-shot test against the CPU, the search's kernels
              on the host and its genotype against the CPU's, NCCL with two GPUs) and the zero-cost proxies   150 s
    search    the paper's miniImageNet 5-cell preset (48 channels, MetaNTK of MAML; prune_launch.py) on synthetic
              84x84 data, ``--repeat 1``: the seconds of each round finished in the time                      100 s
    train     mini-5cell-1 at the paper's settings (48 channels, 5 cells, batch 64) for 2 epochs of 6,400
              synthetic 84x84 images, then a 100-episode 1- and 5-shot test: training images/s (second epoch),
              the few-shot test's time, the precision and --gpu_augment as chosen                             130 s
    genotype  the demo's search (``make demo``'s flags, 16x16 digits) on the CPU and on the GPU side by side:
              the same genotype.json? the same history.jsonl without ``measured``?                             120 s

Writes ``DIR/gpu_check.json`` (the numbers) and each step's log in DIR; prints one line per step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"tests": 150, "search": 100, "train": 130, "genotype": 120}
DATA_LIMIT_S = 40
DEMO_SEARCH = ["--dataset", "MetaDigits", "--rand_seed", "0", "--ntk_channels", "4", "--image_size", "16",
               "--batch_size", "2", "--repeat", "1", "--prune_number", "2", "--regions_batch_size", "300"]


class Clock:
    """The time left of the whole check."""

    def __init__(self, total_s: float):
        self.end = time.monotonic() + total_s

    def limit(self, step_s: float) -> float:
        return max(1.0, min(step_s, self.end - time.monotonic()))


def run(cmd: list[str], log: Path, limit_s: float, env: dict | None = None) -> tuple[int, float]:
    """Run ``cmd`` from the repository's root with its output in ``log``; kill its process group after
    ``limit_s``. Returns (exit code, 124 when killed; seconds)."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            code = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = 124
    return code, round(time.monotonic() - start, 1)


def lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def step_tests(out: Path, clock: Clock) -> dict:
    code, wall = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs"],
                     out / "tests.log", clock.limit(LIMITS["tests"]))
    tail = (out / "tests.log").read_text().strip().splitlines()
    return {"rc": code, "wall_s": wall, "summary": tail[-1] if tail else ""}


def step_search(out: Path, clock: Clock, data: Path, device: str) -> dict:
    folder = out / "paper5"
    code, wall = run([sys.executable, "prune_launch.py", "--dataset", "mini", "--cells", "5", "--data_path",
                      str(data), "--save_dir", str(folder), "--device", device, "--rand_seed", "0", "--repeat", "1",
                      "--overwrite"], out / "search.log", clock.limit(LIMITS["search"]))
    rounds = lines(folder / "history.jsonl")
    return {"rc": code, "wall_s": wall, "finished": (folder / "done").exists(), "rounds_done": len(rounds),
            "round_s": [round(r.get("measured", {}).get("seconds", float("nan")), 1) for r in rounds],
            "candidates": [len(r.get("candidates", [])) for r in rounds],
            "pass_size": [r.get("measured", {}).get("pass_size") for r in rounds]}


def step_train(out: Path, clock: Clock, data: Path, device: str) -> dict:
    folder = out / "train"
    code, wall = run([sys.executable, "eval_searched_arch.py", "--genotype", "mini-5cell-1", "--dataset",
                      "MiniImageNet", "--data_path", str(data), "--epochs", "2", "--n_test_runs", "100",
                      "--eval_splits", "test", "--device", device, "--save_dir", str(folder), "--progress", "false",
                      "--overwrite"], out / "train.log", clock.limit(LIMITS["train"]))
    return {"rc": code, "wall_s": wall, **train_numbers(folder, out / "train.log", images=6400)}


def train_numbers(folder: Path, log_file: Path, images: int) -> dict:
    """What a training's folder and log say: the epochs' times, images/s of the last epoch (``images`` per
    epoch: 64 classes x 100 images, whole batches of 64), the few-shot test, the precision, --gpu_augment."""
    epochs = lines(folder / "metrics.jsonl")
    results = json.loads((folder / "results.json").read_text()) if (folder / "results.json").exists() else {}
    log = log_file.read_text() if log_file.exists() else ""
    return {"epoch_s": [round(e["time"], 1) for e in epochs],
            "images_per_s": round(images / epochs[-1]["time"], 1) if epochs else None,
            "fewshot_test_s": round(results["eval_time_s"], 1) if "eval_time_s" in results else None,
            "fewshot": {s: round(v["mean"], 2) for s, v in results.get("fewshot", {}).get("test", {}).items()},
            "precision": next((w for w in ("bf16", "fp16", "float32") if f"precision: {w}" in log), None),
            "gpu_augment": "--gpu_augment off" not in log and "--gpu_augment: the training images" in log,
            "memory": results.get("memory")}


def step_genotype(out: Path, clock: Clock, device: str) -> dict:
    limit = clock.limit(LIMITS["genotype"])
    threads = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
    procs = {}
    for name in ("cpu", "gpu"):  # side by side: the CPU search's threads leave the GPU search cores
        cmd = [sys.executable, "prune_metantknas.py", *DEMO_SEARCH, "--device", "cpu" if name == "cpu" else device,
               "--overwrite", "--save_dir", str(out / f"demo_{name}"), "--threads", threads]
        log = open(out / f"genotype_{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True), log, time.monotonic())
    walls, codes = {}, {}
    for name, (proc, log, start) in procs.items():
        try:
            codes[name] = proc.wait(timeout=max(1.0, start + limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            codes[name] = 124
        log.close()
        walls[name] = round(time.monotonic() - start, 1)
    return {"rc": codes, "wall_s": walls, **compare_searches(out / "demo_cpu", out / "demo_gpu")}


def compare_searches(cpu: Path, gpu: Path) -> dict:
    """The two searches' genotypes, and their histories without the measurements (κ itself differs in the
    last digits between devices; the rounded Δκ and the ranks should not)."""
    genotypes = [json.loads((d / "genotype.json").read_text())["genotype"] if (d / "genotype.json").exists()
                 else None for d in (cpu, gpu)]
    histories = []
    for d in (cpu, gpu):
        rows = [{k: v for k, v in r.items() if k != "measured"} for r in lines(d / "history.jsonl")]
        for r in rows:
            for c in r.get("candidates", []):
                c.pop("kappa", None)
        histories.append(rows)
    ranks_equal = bool(histories[0]) and histories[0] == histories[1]
    return {"genotypes_equal": genotypes[0] is not None and genotypes[0] == genotypes[1],
            "history_equal_without_kappa": ranks_equal}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/gpu_check", help="folder of the logs and gpu_check.json")
    parser.add_argument("--steps", default=",".join(LIMITS), help=f"some of {','.join(LIMITS)}")
    parser.add_argument("--total_s", type=float, default=540.0, help="time limit of the whole check")
    parser.add_argument("--device", default="cuda", help="the device of the timed runs (cpu: to try the check "
                        "itself on a machine without a GPU; the genotype step then compares the CPU with itself)")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(LIMITS))
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; use some of {', '.join(LIMITS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.total_s)
    report = {"device": device_line()}
    print(report["device"], flush=True)
    data = out / "mini"
    if {"search", "train"} & set(steps) and not (data / "done").exists():
        code, _ = run([sys.executable, "-m", "search_lib.synthetic", "--out", str(data), "--dataset", "mini",
                       "--train-classes", "64", "--val-classes", "16", "--test-classes", "20",
                       "--images-per-class", "100", "--image-size", "84", "--seed", "0"], out / "data.log",
                      clock.limit(DATA_LIMIT_S))
        if code == 0:
            (data / "done").write_text("")
    for step in steps:
        report[step] = {"tests": lambda: step_tests(out, clock),
                        "search": lambda: step_search(out, clock, data, args.device),
                        "train": lambda: step_train(out, clock, data, args.device),
                        "genotype": lambda: step_genotype(out, clock, args.device)}[step]()
        print(f"{step}: {json.dumps(report[step])}", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


def device_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__}: no CUDA device (the steps will fail or be skipped)"
    return f"torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}"


if __name__ == "__main__":
    sys.exit(main())
