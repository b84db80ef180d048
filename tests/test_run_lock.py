"""One process per run folder (issue 20): the folder's lock (search_lib.core.run_dir.FolderLock) for the search, the
training, the sweep and the proxy study.

Real processes where it matters: a second search or training on a folder another one runs in exits 2 at once
naming the holder while the first finishes as usual; a SIGKILLed run leaves its lock file behind, and the re-run
takes the folder and resumes (the kill tests of tests/test_batch_runs.py); ``--overwrite`` on a held folder is
refused and deletes nothing; two proxy-study processes in one folder never study the same architecture.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_batch_runs import (
    ENV,
    LIMIT,
    REPO,
    _Background,
    _error_line,
    _run,
    _search_cmd,
    _snapshot,
    _train_cmd,
    _wait_until,
)
from test_proxy_study import _argv as _study_argv

from eval_lib.commands import study_command, sweep
from search_lib.core.errors import FolderInUse
from search_lib.core.folder_lock import LOCK_FILE, FolderLock, describe_holder

ME = os.getpid()


def _holder_named(line: str, pid: int) -> None:
    assert f"pid {pid} on host {socket.gethostname()}" in line and "command: " in line, line
    assert "is in use by another process" in line or "in use by other processes" in line, line

# ---- the lock itself ------------------------------------------------------------------------------------------

def test_a_second_holder_is_refused_with_the_first_named_and_a_release_empties_the_file(tmp_path):
    first, second = FolderLock(tmp_path), FolderLock(tmp_path)
    assert first.acquire() is None and first.held
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == ME and record["host"] == socket.gethostname() and record["started"]
    assert second.acquire() == record  # another descriptor, even in this process, is another holder
    assert second.acquire(shared=True) == record and not second.held
    assert FolderLock(tmp_path).holder() == record and f"pid {ME}" in describe_holder(record)
    first.release()
    assert (tmp_path / LOCK_FILE).read_text() == "" and FolderLock(tmp_path).holder() is None
    assert second.acquire() is None
    second.release()


def test_shared_holders_keep_an_exclusive_taker_out(tmp_path):
    a, b, c = FolderLock(tmp_path), FolderLock(tmp_path), FolderLock(tmp_path)
    assert a.acquire(shared=True) is None and b.acquire(shared=True) is None
    assert c.acquire() == {}  # held, by processes that write no name
    assert FolderLock(tmp_path).holder() is None  # a probe sees no exclusive holder
    a.release()
    b.release()
    assert c.acquire() is None
    assert c.acquire(shared=True) is None and c.shared  # converted, still held
    c.release()


def test_an_early_look_creates_nothing_and_hold_refuses_a_held_folder(tmp_path):
    from search_lib.search.search_run import search_run_dir

    for folder in (tmp_path / "absent", tmp_path):  # a folder without a lock file: nothing to look at yet
        run = search_run_dir(folder)
        run.hold(early=True)
        assert not run.lock.held and not (folder / LOCK_FILE).exists()
    run.hold()  # the first write: the lock file appears
    assert run.lock.held and (tmp_path / LOCK_FILE).exists()
    with pytest.raises(FolderInUse, match=rf"--save_dir {tmp_path} is in use by another process \(pid {ME} "):
        search_run_dir(tmp_path).hold(early=True)
    with pytest.raises(FolderInUse, match="--overwrite is refused while it runs"):
        search_run_dir(tmp_path).hold(overwrite=True)
    run.release()
    with FolderLock(tmp_path).hold("x") as lock:
        assert lock.held
    assert not lock.held


# ---- two processes on one folder ------------------------------------------------------------------------------

def _holder_pid(folder: Path) -> int | None:
    try:
        return json.loads((folder / LOCK_FILE).read_text() or "null")["pid"]
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _second_is_refused(first: _Background, folder: Path, cmd: list[str]) -> None:
    """Once ``first`` holds ``folder``, ``cmd`` exits 2 at once naming it. The first is stopped (SIGSTOP) meanwhile,
    so that however slow the machine, it still holds the folder when the second looks; then it continues."""
    _wait_until(lambda: _holder_pid(folder) == first.proc.pid, first, what="the first run took the folder")
    os.kill(first.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        second = _run(cmd, timeout=LIMIT)
        took = time.monotonic() - t0
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-2000:]
    _holder_named(_error_line(second.stderr), first.proc.pid)
    assert took < LIMIT / 4  # at once: start-up and a look at the lock file, no work


@pytest.mark.slow  # 30 s; the training's twin below goes through the same session lock by default
def test_a_second_search_in_a_running_search_folder_exits_2_and_the_first_finishes(synthetic_mini, tmp_path):
    run = tmp_path / "run"
    first = _Background(_search_cmd(synthetic_mini, run), tmp_path, "first")
    try:
        _second_is_refused(first, run, _search_cmd(synthetic_mini, run))
        assert first.wait() == 0, first.stderr()[-2000:]
    finally:
        first.kill()
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert (run / "done").exists() and [h["phase"] for h in history] == ["ops", "ops", "edges"]
    assert json.loads((run / "genotype.json").read_text())["string"].startswith("Genotype(")
    assert (run / LOCK_FILE).read_text() == ""  # released on the way out


def test_a_second_training_in_a_running_training_folder_exits_2_and_the_first_finishes(tmp_path):
    run = tmp_path / "run"
    first = _Background(_train_cmd(run), tmp_path, "first")
    try:
        _second_is_refused(first, run, _train_cmd(run))
        assert first.wait() == 0, first.stderr()[-2000:]
    finally:
        first.kill()
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and len(results["fewshot"]["test"]["1"]["accuracies"]) == 5
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("script", ["search", "train"])
def test_overwrite_of_a_held_folder_is_refused_and_deletes_nothing(script, synthetic_mini, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    names = (["config.json", "state.json", "history.jsonl", "done", "search.log"] if script == "search" else
             ["config.json", "checkpoint.pt", "metrics.jsonl", "results.json", "done", "train.log"])
    for name in names:  # what --overwrite would delete
        (run / name).write_text("{}")
    cmd = _search_cmd(synthetic_mini, run) if script == "search" else _train_cmd(run)
    with FolderLock(run).hold("test"):  # this process plays the running run
        before = _snapshot(run)
        proc = _run([*cmd, "--overwrite"])
        after = _snapshot(run)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = _error_line(proc.stderr)
    _holder_named(line, ME)
    assert "--overwrite is refused while it runs (nothing was deleted)" in line
    assert after == before


# ---- the sweep ------------------------------------------------------------------------------------------------

def test_sweep_reports_a_held_job_as_running_elsewhere_and_a_second_sweep_is_refused(tmp_path, capsys):
    busy, free = tmp_path / "busy", tmp_path / "free"
    busy.mkdir()
    script = tmp_path / "job.py"
    script.write_text("import sys, pathlib\np = pathlib.Path(sys.argv[2]); p.mkdir(parents=True, exist_ok=True)\n"
                      "(p / 'done').write_text('')\n")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"python {script} --save_dir {busy}\npython {script} --save_dir {free}\n")
    argv = ["--jobs_file", str(jobs), "--gpus", "none", "--save_root", str(tmp_path / "root")]
    with FolderLock(busy).hold("test"):  # a hand-started run of the first job
        assert sweep.main(argv + ["--dry_run"]) == 0
        assert "busy  running elsewhere" in capsys.readouterr().out
        assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert f"[running elsewhere] busy: held by pid {ME}" in out and "[start] free" in out and "[start] busy" not in out
    summary = json.loads((tmp_path / "root" / "sweep_logs" / "summary.json").read_text())
    assert {j["job"]: j["status"] for j in summary["jobs"]} == {"busy": "running elsewhere", "free": "ok"}
    assert not (busy / "done").exists() and (free / "done").exists()
    with FolderLock(tmp_path / "root" / "sweep_logs").hold("test"):  # a sweep still running on that log folder
        assert sweep.main(argv) == 2
    line = _error_line(capsys.readouterr().err)
    assert "the sweep's --log_dir" in line and f"pid {ME}" in line and "--log_dir" in line


# ---- the proxy study ------------------------------------------------------------------------------------------

def _studied(log: str) -> list[str]:
    """The architectures a study process computed (their "[n/m] id: Genotype(...)" lines)."""
    return [line.split()[1].rstrip(":") for line in log.splitlines()
            if line.startswith("[") and ": Genotype(" in line]


def test_two_study_processes_in_one_folder_never_study_the_same_architecture(synthetic_mini, tmp_path):
    save_dir = tmp_path / "study"
    cmd = [sys.executable, "-m", "eval_lib.proxy_study", *_study_argv(synthetic_mini, save_dir, "--n_archs", "2")]
    procs = []
    for name in ("a", "b"):
        with open(tmp_path / f"{name}.out", "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT))
    for p in procs:
        assert p.wait(timeout=2 * LIMIT) == 0, (tmp_path / "a.out").read_text()[-2000:]
    logs = [(tmp_path / f"{n}.out").read_text() for n in ("a", "b")]
    done = [_studied(log) for log in logs]
    assert sorted(done[0] + done[1]) == ["000-random0", "001-random1"], logs
    assert (save_dir / "done").exists() and len((save_dir / "study.jsonl").read_text().splitlines()) == 2


def test_study_overwrite_is_refused_while_a_shard_works(synthetic_mini, tmp_path, capsys):
    save_dir = tmp_path / "study"
    (save_dir / "archs" / "001-random1").mkdir(parents=True)
    (save_dir / "keep.json").write_text("{}")
    shard, arch = FolderLock(save_dir), FolderLock(save_dir / "archs" / "001-random1")
    assert shard.acquire(shared=True) is None and arch.acquire() is None  # a shard studying architecture 1
    try:
        before = _snapshot(save_dir)
        assert study_command.main(_study_argv(synthetic_mini, save_dir, "--overwrite")) == 2
        assert _snapshot(save_dir) == before
    finally:
        arch.release()
        shard.release()
    line = _error_line(capsys.readouterr().err)
    assert "in use by other processes of this proxy study" in line and f"shard pid {ME}" in line
    assert "--overwrite is refused" in line
