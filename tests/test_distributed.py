"""The search under torchrun (2 CPU processes, gloo): the same result as one process, a rank killed mid-round
resumes under --max-restarts, and a user error gives one message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import prune_metantknas
from search_lib.core.distributed import World

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "MetaDigits", "--ntk_channels", "4", "--ntk_layers", "2", "--image_size", "8", "--batch_size",
        "2", "--n_ways", "3", "--repeat", "2", "--prune_number", "3", "--lr_batch_size", "40", "--lr_batches", "1",
        "--device", "cpu", "--rand_seed", "4"]
LONGER = ["--dataset", "MetaDigits", "--ntk_channels", "4", "--ntk_layers", "5", "--image_size", "8", "--batch_size",
          "2", "--n_ways", "3", "--repeat", "2", "--prune_number", "1", "--lr_batch_size", "40", "--lr_batches", "1",
          "--device", "cpu", "--rand_seed", "6"]


def _torchrun(args: list[str], nproc: int = 2, extra: tuple[str, ...] = (), **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
           str(ROOT / "prune_metantknas.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, **popen)


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _same_scores(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for ca, cb in zip(ra["candidates"], rb["candidates"]):
            assert ca["regions"] == cb["regions"] and ca["rank_sum"] == cb["rank_sum"]
            for ka, kb in zip(ca["kappa"], cb["kappa"]):
                assert abs(ka - kb) <= 1e-6 * abs(ka)
        for ka, kb in zip(ra["kappa_full"], rb["kappa_full"]):
            assert abs(ka - kb) <= 1e-6 * abs(ka)


def test_world_shards_and_merges():
    n = 7
    for size in (1, 2, 3):
        shards = [list(World(r, size).shard(n)) for r in range(size)]
        assert sorted(i for s in shards for i in s) == list(range(n))
    assert World().merge(3, ["a", "b", "c"]) == ["a", "b", "c"]


@pytest.mark.slow  # 34 s on 2 cores; test_distributed_train runs torchrun by default
def test_two_processes_give_the_single_process_search(tmp_path):
    proc = _torchrun([*TINY, "--save_dir", str(tmp_path / "two")])
    assert prune_metantknas.main([*TINY, "--save_dir", str(tmp_path / "one")]) == 0
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert json.loads((two / "genotype.json").read_text()) == json.loads((one / "genotype.json").read_text())
    _same_scores(_history(one), _history(two))
    assert (two / "done").exists() and len(list(two.glob("*.tmp"))) == 0
    assert (out + err).count("genotype: Genotype(") == 1  # rank 0 alone reports


def test_a_user_error_under_torchrun_is_one_line(tmp_path):
    proc = _torchrun([*TINY, "--ntk_layers", "8", "--ntk_N", "1", "--save_dir", str(tmp_path / "bad")])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--ntk_N 1" in lines[0]
    # the ranks exit with the user-error code; the only traceback is torchrun's own report of that
    assert "exitcode  : 2" in err  # the agent may stop the other rank before it exits by itself
    assert "search_lib/" not in err and 'prune_metantknas.py", line' not in err
    assert not (tmp_path / "bad").exists()


def _workers(pid: int) -> list[int]:
    """The child processes of torchrun's agent (the ranks)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@pytest.mark.slow
def test_a_rank_killed_mid_round_resumes_to_the_same_genotype(tmp_path):
    ref = tmp_path / "ref"
    assert prune_metantknas.main([*LONGER, "--save_dir", str(ref)]) == 0
    run = tmp_path / "killed"
    # output to a file: nobody reads a pipe while the test polls, and a full pipe would block the ranks
    log = open(tmp_path / "torchrun.log", "w")
    proc = _torchrun([*LONGER, "--save_dir", str(run)], extra=("--max-restarts=1",), stdout=log,
                     stderr=subprocess.STDOUT)
    killed = False
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        state = run / "state.json"
        if not killed and state.exists() and json.loads(state.read_text() or "{}").get("round", 0) >= 1:
            workers = _workers(proc.pid)
            if workers and not (run / "done").exists():
                os.kill(workers[-1], signal.SIGKILL)  # a rank dies during round 1 (or later)
                killed = True
        time.sleep(0.05)
    proc.wait(timeout=60)
    log.close()
    text = (tmp_path / "torchrun.log").read_text()
    assert killed, "the search ended before a rank could be killed; make LONGER longer"
    assert proc.returncode == 0, text[-3000:]
    assert "resuming at round" in text
    assert json.loads((run / "genotype.json").read_text())["string"] == \
        json.loads((ref / "genotype.json").read_text())["string"]
    _same_scores(_history(ref), _history(run))
