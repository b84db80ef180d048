"""Two runs sharing one box against one alone: the demo's search and a training epoch (docs/benchmarks.md).

    python -m benchmarks.bench_shared [--what search,train] [--modes default,no-turns,spin=0,...] [--repeat N]
                                      [--extra "--threads 2"] [--repo OTHER_CHECKOUT] [--json]

Each measurement runs the real command line in subprocesses: first one alone, then two copies started
together, and prints their wall times (for the training, the time of its second epoch, read from
metrics.jsonl: the first warms up), the side-by-side / alone ratio, and the resident high-water mark of
every process (``os.wait4``). The ratio is what matters: sharing 2 cores fairly between two runs gives about
2x; OpenMP threads spinning against each other gave 4.3x before the thread counts were tuned. ``--extra``
appends flags to every command (``--threads 2`` shows a fixed count); ``--repo`` runs another checkout's
scripts (with its own ``.venv`` when it has one), e.g. an earlier version for the numbers before a change.
``--modes`` measures several ways of running in one go (each alone, then two side by side): ``default`` (the
environment as it is, less thread counts), ``no-turns`` (``--no-take_turns``: the runs do not take turns at
the cores and the scheduler interleaves their threads; `search_lib.core.turns`), ``spin=N`` (GOMP_SPINCOUNT=N:
OpenMP threads spin N times at a barrier, then sleep), ``passive`` (OMP_WAIT_POLICY=PASSIVE: they sleep at
once), ``tuned`` (``--tune_threads``: the thread count of the search's passes or the training's steps chosen by
timing, load-dependent) and ``threads=N`` (``--threads N``). Every ratio is printed twice: against the same
mode alone, and against the first mode alone (the baseline of the same run). The machine's other load changes
every number: run it on a quiet machine, compare ratios of one run, and repeat: ``--repeat N`` measures every
mode N times, round by round, and reports the median of every time, with the range of the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
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
    p.add_argument("--modes", default="default", help="comma-separated: default, no-turns, spin=N, passive, tuned, "
                   "threads=N "
                   "(the first is the baseline of the ratios)")
    p.add_argument("--extra", default="", help="flags appended to every command, e.g. '--threads 2'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repo", default=str(REPO), help="the checkout whose scripts run (default: this one)")
    p.add_argument("--repeat", type=int, default=1, help="measure every mode this many times, round by round "
                   "(medians reported)")
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


_MODE_ENV = ("OMP_NUM_THREADS", "METANTKNAS_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def mode_settings(mode: str, what: str) -> tuple[dict[str, str], list[str]]:
    """The environment variables and extra flags of a mode (see the module's text)."""
    name, _, value = mode.partition("=")
    if name == "default":
        return {}, []
    if name == "spin" and value.isdigit():
        return {"GOMP_SPINCOUNT": value}, []
    if name == "passive":
        return {"OMP_WAIT_POLICY": "PASSIVE"}, []
    if name == "tuned":
        return {}, ["--tune_threads"]
    if name == "no-turns":
        return {}, ["--no-take_turns"]
    if name == "threads" and value.isdigit():
        return {}, ["--threads", value]
    raise SystemExit(f"error: unknown mode {mode!r}; use default, no-turns, spin=N, passive, tuned or threads=N")


def _start(cmd: list[str], settings: dict[str, str] | None = None) -> tuple[subprocess.Popen, float]:
    """Start ``cmd`` without the user's thread counts; a mode's ``settings`` replace the spinning ones too."""
    drop = _MODE_ENV if settings is not None else _MODE_ENV[:2]
    env = {k: v for k, v in os.environ.items() if k not in drop} | (settings or {})
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


def measure(repo: Path, what: str, extra: list[str], device: str, mode: str = "default") -> dict:
    env, flags = mode_settings(mode, what)
    settings = env if mode != "default" else None
    with tempfile.TemporaryDirectory(prefix="bench_shared_") as tmp:
        root = Path(tmp)
        alone = _finish(*_start(_command(repo, what, root / "alone", extra + flags, device), settings), what,
                        root / "alone")
        started = [_start(_command(repo, what, root / f"side{i}", extra + flags, device), settings)
                   for i in range(2)]
        side = [_finish(p, t0, what, root / f"side{i}") for i, (p, t0) in enumerate(started)]
    key = "epoch_s" if what == "train" else "wall_s"
    return {"what": what, "mode": mode, "key": key, "alone": alone, "side_by_side": side,
            "ratio": round(max(s[key] for s in side) / alone[key], 2)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    extra = shlex.split(args.extra)
    repo = Path(args.repo).resolve()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] or ["default"]
    rows, rounds = [], max(1, args.repeat)
    for what in (w.strip() for w in args.what.split(",") if w.strip()):
        measured: dict[str, list[dict]] = {mode: [] for mode in modes}
        for k in range(rounds):  # round by round, so that a slow spell of the machine touches every mode
            for mode in modes:
                row = measure(repo, what, extra, args.device, mode)
                measured[mode].append(row)
                if not args.json and rounds > 1:
                    print(f"round {k + 1}: ", end="")
                    _print_row(_relative(row, measured[modes[0]][k]))
        for mode in modes:
            row = _relative(_median_row(measured[mode]), _median_row(measured[modes[0]]))
            rows.append(row)
            if not args.json:
                _print_row(row, f"median of {rounds}: " if rounds > 1 else "")
    if args.json:
        print(json.dumps({"repo": str(repo), "extra": args.extra, "cpus": len(os.sched_getaffinity(0)),
                          "repeat": rounds, "load_after": os.getloadavg()[0], "rows": rows}))
    return 0


def _side(row: dict) -> float:
    return max(s[row["key"]] for s in row["side_by_side"])  # the slower of the two


def _median_row(rows: list[dict]) -> dict:
    """One row of the medians of ``rows`` (one mode's rounds), with the range of their ratios."""
    if len(rows) == 1:
        return rows[0]
    key = rows[0]["key"]
    alone = statistics.median(r["alone"][key] for r in rows)
    side = statistics.median(_side(r) for r in rows)
    ratios = [r["ratio"] for r in rows]
    return {**rows[0], "alone": {key: alone, "peak_rss_mb": max(r["alone"]["peak_rss_mb"] for r in rows)},
            "side_by_side": [{key: side, "peak_rss_mb": max(s["peak_rss_mb"] for r in rows
                                                          for s in r["side_by_side"])}],
            "ratio": round(side / alone, 2), "ratio_range": [min(ratios), max(ratios)], "rounds": rows}


def _relative(row: dict, first: dict) -> dict:
    """``row`` with its times against ``first``'s time alone (the first mode: the baseline of the same run)."""
    key = row["key"]
    return {**row, "ratio_to_first": round(_side(row) / first["alone"][key], 2),
            "alone_to_first": round(row["alone"][key] / first["alone"][key], 2)}


def _print_row(r: dict, prefix: str = "") -> None:
    side = " / ".join(f"{s[r['key']]:.1f} s" for s in r["side_by_side"])
    spread = f" (rounds {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}x)" if "ratio_range" in r else ""
    peaks = ", ".join(f"{s['peak_rss_mb']:.0f}" for s in [r["alone"], *r["side_by_side"]])
    print(f"{prefix}{r['what']:6s} {r['mode']:12s} ({r['key']}): alone {r['alone'][r['key']]:.1f} s "
          f"({r['alone_to_first']:.2f}x the first mode's), side by side {side}: {r['ratio']:.2f}x alone{spread}, "
          f"{r['ratio_to_first']:.2f}x the first mode alone   (peak resident MB: {peaks}; load "
          f"{os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
