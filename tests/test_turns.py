"""Turn-taking at the cores (search_lib.core.turns): runs on one machine hold a slot per step, alternate fairly
when there are fewer slots than runs, never block each other after a kill, and wait without changing a number."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from histories import training_numbers

import eval_searched_arch
from search_lib.core import turns
from search_lib.core.threads import available_cpus
from search_lib.core.turns import Turns, TurnsUnavailable, open_turns

REPO = Path(__file__).resolve().parents[1]

# a run of ``n`` steps of ``hold`` seconds each, started when the file ``go`` appears; prints its steps' times
WORKER = """
import json, os, sys, time
from search_lib.core.turns import Turns
folder, slots, n, hold, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
t = Turns(slots=slots, folder=folder)
while not os.path.exists(go):
    time.sleep(0.005)
steps = []
for _ in range(n):
    with t.step():
        start = time.monotonic()
        time.sleep(hold)
        steps.append([start, time.monotonic()])
print(json.dumps({"steps": steps, "waits": t.waits}))
"""

# holds every slot of ``folder`` (or for ``seconds``), after printing "held"
HOLDER = """
import fcntl, os, sys, time
folder, slots, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fds = [os.open(os.path.join(folder, f"slot{i}"), os.O_RDWR | os.O_CREAT, 0o600) for i in range(slots)]
for fd in fds:
    fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(seconds)
"""


def _two_runs(folder: Path, slots: int, n: int = 8, hold: float = 0.05) -> list[dict]:
    go = folder / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(folder), str(slots), str(n), str(hold), str(go)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)  # both started and waiting for the signal
    go.touch()
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return outs


def _overlaps(a: list, b: list) -> bool:
    return any(s0 < e1 and s1 < e0 for s0, e0 in a for s1, e1 in b)


def test_two_runs_with_one_slot_never_overlap_and_alternate(tmp_path):
    first, second = _two_runs(tmp_path, slots=1)
    assert not _overlaps(first["steps"], second["steps"])
    assert first["waits"] > 0 and second["waits"] > 0
    # fair: while both run, neither takes two turns in a row (the door queues the one that just had its turn)
    order = [who for _, who in sorted([(s[0], 0) for s in first["steps"]] + [(s[0], 1) for s in second["steps"]])]
    both = order[order.index(1 - order[0]):]  # from the second run's first step
    last = max(i for i, who in enumerate(both) if who != both[-1])  # the last step before one of them ended
    assert all(a != b for a, b in zip(both[:last], both[1:last + 1])), order


def test_two_runs_with_two_slots_run_at_once(tmp_path):
    first, second = _two_runs(tmp_path, slots=2)
    assert _overlaps(first["steps"], second["steps"])
    assert first["waits"] == 0 and second["waits"] == 0


def test_a_killed_holder_leaves_its_slot_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "1", "600"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        fd = os.open(tmp_path / "slot0", os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel released it with the process
        os.close(fd)
    finally:
        holder.kill()
        holder.wait()
    t = Turns(folder=tmp_path)
    with t.step():
        pass
    assert t.waits == 0


def _slot_free(folder: Path) -> bool:
    fd = os.open(folder / "slot0", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing the descriptor releases what it took


def test_a_step_inside_a_step_keeps_the_outer_turn(tmp_path):
    t = Turns(folder=tmp_path)
    with t.step():
        with t.step():
            pass
        assert not _slot_free(tmp_path)  # the inner step did not give the outer one's slot back
        assert list(t.over([1, 2])) == [1, 2]
        assert not _slot_free(tmp_path)
    assert _slot_free(tmp_path)


def test_a_loop_holds_its_turn_for_each_item_and_gives_it_back_when_closed(tmp_path):
    t = Turns(folder=tmp_path)
    items = t.over(range(3))
    assert next(items) == 0 and not _slot_free(tmp_path)  # the body runs in the turn
    items.close()  # what contextlib.closing does when a step raises
    assert _slot_free(tmp_path)


def test_a_forked_child_drops_its_copies_of_the_locks(tmp_path):
    t = Turns(folder=tmp_path)
    with t.step():
        pid = os.fork()
        if pid == 0:  # a loader worker: its copies would keep the slot of a parent killed meanwhile
            os._exit(0 if t._fds is None else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and _slot_free(tmp_path)


def test_turns_are_off_on_a_gpu_under_torchrun_and_when_asked():
    assert not open_turns(True, device_type="cuda", distributed=False, threads=4, cpus=16).enabled
    assert not open_turns(True, device_type="cpu", distributed=True, threads=4, cpus=16).enabled
    assert not open_turns(False, device_type="cpu", distributed=False, threads=4, cpus=16).enabled
    on = open_turns(True, device_type="cpu", distributed=False, threads=4, cpus=16)
    assert on.enabled and on.slots == 4
    assert open_turns(True, device_type="cpu", distributed=False, threads=8, cpus=2).slots == 1
    with on.step():  # no folder touched when off; on: it takes a slot
        pass


@pytest.mark.parametrize("plant", ["link", "shared"])
def test_a_planted_default_folder_turns_them_off_with_a_warning(plant, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(turns.TURNS_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    target = turns.default_folder()
    if plant == "link":
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    else:
        target.mkdir()
        target.chmod(0o777)
    with pytest.raises(TurnsUnavailable):
        Turns()
    with caplog.at_level(logging.WARNING, logger="metantknas.turns"):
        assert not open_turns(True, device_type="cpu", distributed=False, threads=1, cpus=2).enabled
    assert "will not take turns" in caplog.text and turns.TURNS_ENV in caplog.text


def test_a_named_folder_that_cannot_be_used_turns_them_off_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(turns.TURNS_ENV, str(tmp_path / "missing"))
    with caplog.at_level(logging.WARNING, logger="metantknas.turns"):
        assert not open_turns(True, device_type="cpu", distributed=False, threads=1, cpus=2).enabled
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(turns.TURNS_ENV, str(tmp_path / "file"))
    assert not open_turns(True, device_type="cpu", distributed=False, threads=1, cpus=2).enabled
    os.symlink(tmp_path / "elsewhere", tmp_path / "slot0")  # a planted link is not followed
    monkeypatch.setenv(turns.TURNS_ENV, str(tmp_path))
    assert not open_turns(True, device_type="cpu", distributed=False, threads=1, cpus=2).enabled
    assert caplog.text.count("will not take turns") == 3 and not (tmp_path / "elsewhere").exists()


def test_the_default_folder_is_private(tmp_path, monkeypatch):
    monkeypatch.delenv(turns.TURNS_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    t = Turns()
    with t.step():
        pass
    assert t.folder == turns.default_folder() and (t.folder.stat().st_mode & 0o777) == 0o700


TRAIN = ["--genotype", "mini-5cell-1", "--dataset", "Digits", "--init_channels", "4", "--layers", "2", "--epochs", "1",
         "--image_size", "16", "--batch_size", "64", "--n_shots", "1", "--n_queries", "5", "--n_test_runs", "2",
         "--n_aug_support_samples", "1", "--eval_splits", "test", "--num_workers", "0", "--device", "cpu",
         "--no-progress", "--seed", "1"]



def test_a_training_that_waits_for_its_turns_gives_the_same_numbers(tmp_path, monkeypatch):
    folder = tmp_path / "turns"
    folder.mkdir()
    monkeypatch.setenv(turns.TURNS_ENV, str(folder))
    assert eval_searched_arch.main([*TRAIN, "--no-take_turns", "--save_dir", str(tmp_path / "free")]) == 0
    slots = available_cpus()  # the tests' runs use one thread (conftest)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(slots), "600"], stdout=subprocess.PIPE,
                              text=True)

    def release_when_waited():  # the other run ends once the training has waited for a turn
        end = time.monotonic() + 120
        while turns.current().waits == 0 and time.monotonic() < end:
            time.sleep(0.01)
        holder.kill()

    try:
        assert holder.stdout.readline().strip() == "held"
        threading.Thread(target=release_when_waited, daemon=True).start()
        assert eval_searched_arch.main([*TRAIN, "--save_dir", str(tmp_path / "waited")]) == 0
    finally:
        holder.kill()
        holder.wait()
    assert training_numbers(tmp_path / "free") == training_numbers(tmp_path / "waited")
    waited = json.loads((tmp_path / "waited" / "results.json").read_text())["train"]["turns"]
    assert waited["enabled"] and waited["slots"] == slots and waited["waited_steps"] >= 1
    assert json.loads((tmp_path / "free" / "results.json").read_text())["train"]["turns"]["enabled"] is False
    record = json.loads((tmp_path / "waited" / "provenance.json").read_text())
    assert record["threads"]["turns"] == {"enabled": True, "slots": slots}
