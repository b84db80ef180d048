"""Several runs on one box: a list of jobs (the paper's presets x seeds, or command lines from a file) run
side by side, one GPU per job (or ``--jobs N`` on the CPU), one log per job and a summary at the end.

    python -m search_lib.sweep --presets all --seeds 0,1,2            # data from $METANTKNAS_*_DATA
    python -m search_lib.sweep --jobs_file jobs.txt --gpus none --jobs 2 -- --device cpu

A job whose run folder (``--save_dir``) holds ``done`` is skipped, one whose folder another process holds
(`search_lib.core.run_dir.FolderLock`) is reported ``running elsewhere``; any other job runs its command, which
resumes an interrupted run. The sweep holds its log folder's lock: a second sweep on it stops (exit 2).
Exit code: 0 when every job finished, was skipped or runs elsewhere, 1 when any failed, 2 for bad sweep
flags, 130 on Ctrl-C or SIGTERM (running jobs are interrupted; running the sweep again resumes them).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from eval_lib.commands.presets import PRESET_NAMES
from eval_lib.commands.sweep_jobs import Job, make_jobs, preset_commands, read_jobs_file
from search_lib.core.command_line import make_parser, run_cli
from search_lib.core.errors import RunFailure, UsageError, one_line
from search_lib.core.folder_lock import FolderLock, describe_holder
from search_lib.core.threads import available_cpus
from search_lib.core.utils import atomic_write_json

POLL_S = 0.1  # how often running jobs are checked; a job costs minutes, so this is no bottleneck
GRACE_S = 15.0  # time interrupted jobs get to exit on their own before they are killed


@dataclass
class SweepConfig:
    commands: list[list[str]]  # one argv per job, before the project's scripts are resolved
    save_root: str = "runs/sweep"
    log_dir: str | None = None  # default <save_root>/sweep_logs
    summary: str | None = None  # default <log_dir>/summary.json
    gpus: list[int] | None = None  # torch device numbers, one job each; None: CPU
    jobs: int = 1  # jobs at once
    dry_run: bool = False
    break_stale_lock: bool = False  # take over a --log_dir whose lease expired


# ---- running ----------------------------------------------------------------------------------------------

def _cuda_id(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of torch device ``index`` (the child reads it against the physical devices)."""
    parent = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    return parent[index] if index < len(parent) else str(index)


def _start(job: Job, gpu: int | None, log_dir: Path, threads: int) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # logs fill line by line: `tail -f` shows progress
    if "OMP_NUM_THREADS" not in os.environ:  # a fair share of the cores; the user's own setting wins
        env["OMP_NUM_THREADS"] = str(threads)
    if gpu is not None:
        job.gpu = env["CUDA_VISIBLE_DEVICES"] = _cuda_id(gpu)
    job.log = str(log_dir / f"{job.name}.log")
    try:  # appended: the log of an interrupted attempt stays above the resumed one
        job.fh = open(job.log, "a")
        job.fh.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} sweep{'' if gpu is None else ' gpu ' + job.gpu}: "
                     f"{shlex.join(job.argv)}\n")
        job.fh.flush()
    except OSError as exc:
        raise RunFailure(f"cannot write the log {job.log}: {exc.strerror}; choose a writable --log_dir") from None
    print(f"[start] {job.name}{'' if gpu is None else ' (gpu ' + job.gpu + ')'}: {shlex.join(job.argv)}", flush=True)
    job.t0 = time.monotonic()
    try:  # a session of its own: a Ctrl-C reaches the sweep only, which interrupts its jobs itself
        job.proc = subprocess.Popen(job.argv, stdin=subprocess.DEVNULL, stdout=job.fh, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
    except OSError as exc:
        job.fh.write(f"error: cannot start {job.argv[0]}: {exc.strerror or exc}\n")
        job.exit_code = 127  # the shell's code for a command that cannot be found


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 4096))
            lines = [ln for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return one_line(lines[-1], 200) if lines and not lines[-1].startswith("# ") else ""


def _finish(job: Job, code: int, status: str | None = None) -> None:
    job.exit_code, job.wall_s = code, round(time.monotonic() - job.t0, 1)
    job.status = status or ("ok" if code == 0 else "failed")
    job.fh.close()
    why = "" if code == 0 else f", exit {code}: {_last_line(job.log)} (log {job.log})"
    print(f"[{job.status}] {job.name} after {job.wall_s:.1f} s{why}", flush=True)


class _Stop:
    """Set by SIGINT / SIGTERM. The loop checks it between polls, so a signal never lands as an exception inside
    `subprocess` internals (a KeyboardInterrupt there can leave a child's wait lock held and hang the sweep)."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signum = signum


def run_jobs(jobs: list[Job], slots: list[int | None], log_dir: Path, threads: int,
             stop: _Stop | None = None) -> bool:
    """Run the jobs, one per free slot (a GPU number, or None on the CPU); False when interrupted."""
    stop = stop or _Stop()
    pending = [j for j in jobs if j.status == "not run"]
    running: list[tuple[Job, int | None]] = []
    free = list(slots)
    try:
        while (pending or running) and stop.signum is None:
            while pending and free and stop.signum is None:
                job = pending.pop(0)
                holder = job.elsewhere()
                if holder is not None:  # e.g. started by hand, or by another sweep with another --log_dir
                    job.status = "running elsewhere"
                    print(f"[running elsewhere] {job.name}: held by {describe_holder(holder)}; not started", flush=True)
                    continue
                slot = free.pop(0)
                _start(job, slot, log_dir, threads)
                running.append((job, slot))
            for job, slot in list(running):
                code = job.exit_code if job.proc is None else job.proc.poll()
                if code is not None:  # exit 2 on a folder another process took meanwhile: not a failure
                    _finish(job, code, "running elsewhere" if code == 2 and job.elsewhere() is not None else None)
                    running.remove((job, slot))
                    free.append(slot)
            time.sleep(POLL_S)
    except (KeyboardInterrupt, RunFailure) as exc:  # a log that cannot be written (or a signal before ours)
        _interrupt(running)
        if isinstance(exc, RunFailure):
            raise
        return False
    if stop.signum is not None:
        _interrupt(running)
        return False
    return True


def _interrupt(running: list[tuple[Job, int | None]]) -> None:
    """Stop the running jobs, never leave them orphaned: SIGINT to each (the scripts save their state and exit
    130), then kill the stragglers after GRACE_S."""
    alive = [job for job, _ in running if job.proc is not None and job.proc.poll() is None]
    for job in alive:
        job.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + GRACE_S
    for job, _ in running:
        code = job.exit_code
        if job.proc is not None:
            try:
                code = job.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                job.proc.kill()
                code = job.proc.wait()
        _finish(job, code, "interrupted" if job in alive else None)


def table(jobs: Sequence[Job]) -> str:
    rows = [("job", "status", "exit", "wall", "log")]
    rows += [(j.name, j.status, "-" if j.exit_code is None else str(j.exit_code),
              "-" if j.wall_s is None else f"{j.wall_s:.1f} s", j.log or "-") for j in jobs]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


# ---- command line -----------------------------------------------------------------------------------------

def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} takes comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise UsageError(f"{what} takes comma-separated numbers >= 0, got {text!r}")
    return list(dict.fromkeys(values))


def _gpus(text: str) -> list[int] | None:
    count = torch.cuda.device_count()
    if text == "auto":
        return list(range(count)) or None
    if text == "none":
        return None
    ids = _ints(text, "--gpus")
    if max(ids) >= count:
        raise UsageError(f"--gpus {text}: this machine shows {count} CUDA device(s); give numbers below {count}, "
                         f"or --gpus none --jobs N to run on the CPU")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m search_lib.sweep", "Run several searches/trainings on one machine, one GPU per job "
                    "(or --jobs N on the CPU), skipping finished runs. Flags after -- go to every job.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--jobs_file", help="a file of command lines, one job per line (# comments, sh quoting)")
    src.add_argument("--presets", help=f"paper presets, comma-separated ({', '.join(PRESET_NAMES)}) or all")
    p.add_argument("--seeds", default="0", help="seeds for --presets, comma-separated")
    p.add_argument("--save_root", default="runs/sweep", help="--presets runs go to <save_root>/<preset>-seed<S>")
    p.add_argument("--log_dir", default=None, help="one <job>.log per job; default <save_root>/sweep_logs")
    p.add_argument("--summary", default=None, help="summary JSON; default <log_dir>/summary.json")
    p.add_argument("--gpus", default="auto", help="auto (every visible GPU), none (the CPU), or numbers 0,1,...")
    p.add_argument("--jobs", type=int, default=None, help="jobs at once; default one per GPU, 1 on the CPU")
    p.add_argument("--dry_run", action="store_true", help="print the jobs (run or skip) and exit")
    p.add_argument("--break_stale_lock", action="store_true",
                   help="take over a --log_dir whose lease expired (network file systems); after -- it goes to the "
                        "jobs")
    return p


def parse_config(argv: Sequence[str]) -> SweepConfig:
    argv = list(argv)
    extra = []
    if "--" in argv:  # argparse would take the jobs' flags for its own
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if args.jobs_file is not None:
        commands = read_jobs_file(args.jobs_file)
    else:
        names = list(PRESET_NAMES) if args.presets.strip() == "all" else \
            list(dict.fromkeys(n.strip() for n in args.presets.split(",") if n.strip()))
        unknown = [n for n in names if n not in PRESET_NAMES]
        if unknown or not names:
            raise UsageError(f"unknown preset {', '.join(unknown) or repr(args.presets)} in --presets; valid: "
                             f"{', '.join(PRESET_NAMES)} or all")
        commands = preset_commands(names, _ints(args.seeds, "--seeds"), args.save_root)
    gpus = _gpus(args.gpus.strip())
    jobs = args.jobs if args.jobs is not None else (len(gpus) if gpus else 1)
    if jobs < 1 or (gpus and jobs > len(gpus)):
        limit = f"at most the {len(gpus)} GPU(s) of --gpus (one GPU per job)" if gpus else "at least 1"
        raise UsageError(f"--jobs {jobs}: give {limit}")
    return SweepConfig([c + extra for c in commands], args.save_root, args.log_dir, args.summary,
                       gpus[:jobs] if gpus else None, jobs, args.dry_run, args.break_stale_lock)


def sweep(cfg: SweepConfig) -> int:
    jobs = make_jobs(cfg.commands)
    for job in jobs:
        if job.finished():
            job.status = "skipped"
    if cfg.dry_run:
        for job in jobs:
            what = "skip (done)" if job.status == "skipped" else "running elsewhere" if job.elsewhere() else "run"
            print(f"{job.name}  {what}  {shlex.join(job.argv)}")
        return 0
    log_dir = Path(cfg.log_dir or Path(cfg.save_root) / "sweep_logs")
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFailure(f"cannot create --log_dir {log_dir}: {exc.strerror}; choose a writable folder") from None
    # one sweep per log folder: a cron run firing while the last one still runs stops here (exit 2)
    with FolderLock(log_dir, break_stale=cfg.break_stale_lock).hold(f"the sweep's --log_dir {log_dir}",
                                                                     fix="give another --log_dir"):
        return _sweep(cfg, jobs, log_dir)


def _sweep(cfg: SweepConfig, jobs: list[Job], log_dir: Path) -> int:
    slots = list(cfg.gpus) if cfg.gpus else [None] * cfg.jobs
    cores = available_cpus()
    print(f"sweep: {len(jobs)} jobs ({sum(j.status == 'skipped' for j in jobs)} done already), {len(slots)} at once "
          f"on {'GPUs ' + ','.join(_cuda_id(g) for g in cfg.gpus) if cfg.gpus else 'the CPU'}; logs in {log_dir}",
          flush=True)
    stop = _Stop()
    previous = {}
    try:  # Ctrl-C, and a batch system's SIGTERM, stop the jobs (only the main thread may set handlers)
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, stop)
    except ValueError:
        pass
    try:
        completed = run_jobs(jobs, slots, log_dir, max(1, cores // len(slots)), stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [j for j in jobs if j.status == "failed"]
    code = 130 if not completed else (1 if failed else 0)
    print(table(jobs))
    summary = Path(cfg.summary or log_dir / "summary.json")
    atomic_write_json(summary, dict(exit_code=code, jobs=[j.record() for j in jobs], parallel=len(slots),
                                    finished_at=time.strftime("%Y-%m-%dT%H:%M:%S")))
    print(f"summary: {summary}")
    if not completed:
        print("error: interrupted; run the same sweep again to resume", file=sys.stderr)
    elif failed:
        print(f"error: {len(failed)} of {len(jobs)} jobs failed ({', '.join(j.name for j in failed)}); see their "
              f"logs, fix and run the same sweep again (finished jobs are skipped)", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: sweep(parse_config(sys.argv[1:] if argv is None else argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
