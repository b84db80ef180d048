"""Probing never disturbs, and a search locks before it trusts what it read (issue 26); the leases of run folders
on network file systems (the detection mocked: the lease files are plain files on any disk).

* Asking who holds a folder takes no lock on Linux (the kernel's lock table); a starting run that finds the folder
  locked by a probe that names nobody (an older toolkit's, ``flock -s``) retries briefly instead of refusing.
* A search that finds its folder finished by another process between its first look and its lock reports it.
* On a network file system a folder is held by a lease: a live holder's is refused, an expired one is reported
  stale and taken over only with --break_stale_lock, a gone holder's (this host, no such process) is taken.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_batch_runs import ENV, SEARCH_FAST, _error_line
from test_proxy_study import _argv as _study_argv

import prune_metantknas
import search_lib.core.folder_lock as folder_lock
import search_lib.search.search_run as search_run
from eval_lib.commands import study_command
from search_lib.core.errors import FolderInUse
from search_lib.core.file_systems import NETWORK_FILE_SYSTEMS, file_system_type
from search_lib.core.folder_lock import LOCK_FILE, FolderLock

ME = os.getpid()


# ---- probes ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="reads Linux's lock table")
def test_asking_who_holds_a_folder_takes_no_lock(tmp_path, monkeypatch):
    with FolderLock(tmp_path).hold("x"):
        def no_lock(*a):
            raise AssertionError("a probe took a lock")

        monkeypatch.setattr(folder_lock.fcntl, "flock", no_lock)
        assert FolderLock(tmp_path).holder()["pid"] == ME
        monkeypatch.undo()
    assert FolderLock(tmp_path).holder() is None


def test_a_probe_held_while_a_run_starts_does_not_make_it_refuse(tmp_path):
    """A real process holds the lock file shared, naming nobody (a probe), while this process starts a run on the
    folder: the run waits for it instead of refusing; a shared holder that stays is refused after the grace."""
    (tmp_path / LOCK_FILE).write_text("")
    probe = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_SH)\n"
             "print('held', flush=True)\ntime.sleep(float(sys.argv[2]))\n")
    proc = subprocess.Popen([sys.executable, "-c", probe, str(tmp_path / LOCK_FILE), "0.3"], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with FolderLock(tmp_path).hold("the run"):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == ME
        assert time.monotonic() - t0 < folder_lock.PROBE_GRACE_S + 5
    finally:
        proc.wait(timeout=30)
    stays = subprocess.Popen([sys.executable, "-c", probe, str(tmp_path / LOCK_FILE), "30"], env=ENV,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert stays.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match="a process that has not written its name yet"):
            FolderLock(tmp_path).hold("the run")
    finally:
        stays.kill()
        stays.wait(timeout=30)


@pytest.fixture(scope="module")
def finished_search(synthetic_mini, tmp_path_factory):
    """(argv, folder) of a finished tiny search (linear regions only, two ops per edge) with a drawn seed."""
    import numpy as np

    import search_lib.search.pruning as pruning
    from search_lib.models.ops import space_ops

    ops = space_ops("darts_fewshot")

    def initial_alive(self):
        alive = np.zeros((2, len(self.keys), len(self.ops)), dtype=bool)
        alive[:, :, [ops.index("skip_connect"), ops.index("sep_conv_3x3")]] = True
        return alive

    argv = [*SEARCH_FAST, "--rand_seed", "-1", "--data_path", str(synthetic_mini)]  # the last --rand_seed wins
    folder = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pruning.PruningSearch, "initial_alive", initial_alive)
        assert prune_metantknas.main([*argv, "--save_dir", str(folder)]) == 0
    return argv, folder


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_search_finding_its_folder_finished_meanwhile_reports_it(finished_search, tmp_path, monkeypatch, capsys):
    """Another process creates and finishes the search in the folder after this one's first look (there was no
    folder then) and before its lock: this one reports the finished search, and neither restarts it nor writes
    the seed it drew (--rand_seed -1) into its config.json."""
    argv, other = finished_search
    before = _snapshot(other)
    run = tmp_path / "run"
    real = search_run._check_inputs

    def meanwhile(cfg):  # between this run's first look and its lock
        split = real(cfg)
        shutil.copytree(other, run)
        return split

    monkeypatch.setattr(search_run, "_check_inputs", meanwhile)
    capsys.readouterr()
    assert prune_metantknas.main([*argv, "--save_dir", str(run)]) == 0
    assert f"search already finished in {run}" in capsys.readouterr().out
    assert _snapshot(run) == before


def test_summarize_holds_the_study_lock(synthetic_mini, tmp_path, capsys):
    save_dir = tmp_path / "study"
    save_dir.mkdir()
    with FolderLock(save_dir).hold("x"):  # an --overwrite of the study, say
        assert study_command.main(_study_argv(synthetic_mini, save_dir, "--summarize")) == 2
    assert f"pid {ME}" in _error_line(capsys.readouterr().err)


# ---- network file systems ------------------------------------------------------------------------------------

def test_the_file_system_of_a_folder_from_the_mount_table(tmp_path):
    (tmp_path / "my runs" / "scratch").mkdir(parents=True)
    mounts, real = tmp_path / "mounts", os.path.realpath(tmp_path)
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {real}/my\\040runs nfs4 rw,nolock 0 0\n"
                      f"tmpfs {real}/my\\040runs/scratch tmpfs rw 0 0\n")
    assert file_system_type(tmp_path / "my runs" / "a" / "b", str(mounts)) == "nfs4"  # need not exist yet
    assert file_system_type(tmp_path / "my runs" / "scratch" / "x", str(mounts)) == "tmpfs"
    assert file_system_type(tmp_path / "my runsx", str(mounts)) == "ext4"
    assert {"nfs", "nfs4", "cifs", "lustre", "beegfs", "gpfs"} <= NETWORK_FILE_SYSTEMS


@pytest.fixture
def network(monkeypatch):
    """Every folder counts as one on NFS."""
    monkeypatch.setattr(folder_lock, "network_file_system", lambda path: "nfs4")


def _foreign_lease(folder: Path, host: str, pid: int, expires_in: float) -> None:
    """A lease as flufl.lock leaves it for a holder on ``host``: a claim file named after it, hard-linked as
    ``.lease``, its time the lease's expiry."""
    sep = folder_lock.SEPARATOR
    claim = folder / f".lease{sep}{host}{sep}{pid}{sep}12345"
    claim.write_text(str(claim))
    os.link(claim, folder / ".lease")
    when = time.time() + expires_in
    os.utime(claim, (when, when))
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host, "started": "2026-12-02 01:00:03 UTC",
                                                "command": "prune_metantknas.py --save_dir x"}))


@pytest.mark.usefixtures("network")
def test_a_live_lease_is_refused_even_with_break_stale_lock(tmp_path):
    _foreign_lease(tmp_path, "node7.cluster", 4242, expires_in=50)
    for breaking in (False, True):
        with pytest.raises(FolderInUse, match="in use by another process \\(pid 4242 on host node7.cluster"):
            FolderLock(tmp_path, break_stale=breaking).hold("--save_dir x")
    assert FolderLock(tmp_path).holder()["pid"] == 4242


@pytest.mark.usefixtures("network")
def test_an_expired_lease_is_stale_and_taken_only_with_break_stale_lock(finished_search, tmp_path, capsys):
    argv, finished = finished_search
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    _foreign_lease(run, "node7.cluster", 4242, expires_in=-120)  # its node crashed two minutes ago
    before = _snapshot(run)
    assert prune_metantknas.main([*argv, "--save_dir", str(run)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "pid 4242 on host node7.cluster" in line and "stale" in line and "--break_stale_lock" in line, line
    assert _snapshot(run) == before and FolderLock(run).holder()["stale"]
    assert prune_metantknas.main([*argv, "--save_dir", str(run), "--break_stale_lock"]) == 0
    assert f"search already finished in {run}" in capsys.readouterr().out
    assert not (run / ".lease").exists() and (run / LOCK_FILE).read_text() == ""  # taken, then released
    assert not [p.name for p in run.iterdir() if folder_lock.SEPARATOR in p.name]  # no claim file left, nor the old


@pytest.mark.usefixtures("network")
def test_a_lease_of_a_gone_process_on_this_host_is_taken_and_a_held_one_renewed(tmp_path, monkeypatch):
    from flufl.lock import Lock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _foreign_lease(tmp_path, Lock(str(tmp_path / "probe")).hostname, int(dead.stdout), expires_in=50)
    assert FolderLock(tmp_path).holder() is None  # its run is over
    monkeypatch.setattr(folder_lock, "LEASE_S", 2)  # renewed every 0.5 s (the lease's time has whole seconds)
    lock = FolderLock(tmp_path)
    with lock.hold("x"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == ME
        first = os.stat(tmp_path / ".lease").st_mtime
        time.sleep(1.6)
        assert os.stat(tmp_path / ".lease").st_mtime > first  # the holder renews its lease
        assert FolderLock(tmp_path).holder()["pid"] == ME
    assert not (tmp_path / ".lease").exists() and (tmp_path / LOCK_FILE).read_text() == ""
