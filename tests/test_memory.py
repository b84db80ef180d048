"""Memory within a budget (issue 20): --memory_budget, its default, the measured pass size, out-of-memory halving.

The pass-size rule is checked on a hand-computable case; the measurement against a tensor of known size; the
budget end to end by the resident high-water mark of a search subprocess (os.wait4: that child's own peak);
a fake out-of-memory error in the second pass of a round must split the pass and leave the scores of
history.jsonl exactly as an undisturbed run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from histories import assert_same_scores
from test_batch_runs import ENV, REPO, _error_line, two_ops  # noqa: F401  (two_ops is a fixture)

import prune_metantknas
import search_lib.core.memory as memory
import search_lib.search.scoring as scoring
from search_lib.core.errors import UsageError
from search_lib.core.memory import MemoryMeter, parse_size
from search_lib.core.pass_sizing import PassSizer
from search_lib.search.pruning import MEASURED_KEY

GiB, MiB = 1 << 30, 1 << 20


# ---- sizes and the default budget ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [("8GB", 8 * 10**9), ("512MB", 512 * 10**6), ("1.5GiB", 3 * GiB // 2),
                                        ("700m", 700 * MiB), (" 2 g ", 2 * GiB), ("64kB", 64000), ("auto", None),
                                        ("", None)])
def test_sizes_take_a_unit(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["8", "8 parsecs", "-1GB", "0MB", "GB", "1e9"])
def test_bad_sizes_are_one_line_usage_errors(text, capsys, tmp_path):
    with pytest.raises(UsageError, match="--memory_budget"):
        parse_size(text)
    argv = ["--dataset", "MetaDigits", "--save_dir", str(tmp_path / "s"), f"--memory_budget={text}"]
    assert prune_metantknas.main(argv) == 2
    line = _error_line(capsys.readouterr().err)
    assert "--memory_budget" in line and ("e.g. 8GB" in line or "more than zero" in line), line
    assert not (tmp_path / "s").exists()


def test_default_budget_on_the_cpu_is_at_most_4_gib_or_half_of_what_is_available(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "available_memory", lambda: 20 * GiB)
    assert memory.default_budget(cpu) == 4 * GiB
    monkeypatch.setattr(memory, "available_memory", lambda: 6 * GiB)
    assert memory.default_budget(cpu) == 3 * GiB
    assert memory.resolve_budget("1GiB", cpu) == GiB


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_cgroup_limit_lowers_what_is_available(version, tmp_path):
    if version == "v2":
        (tmp_path / "proc").write_text("0::/jobs/42\n")
        folder = tmp_path / "sys" / "jobs" / "42"
        files = {"memory.max": str(3 * GiB), "memory.current": str(2 * GiB),
                 "memory.stat": f"anon 1\ninactive_file {GiB // 2}\n"}
    else:
        (tmp_path / "proc").write_text("5:cpu:/\n4:memory:/jobs/42\n")
        folder = tmp_path / "sys" / "memory" / "jobs" / "42"
        files = {"memory.limit_in_bytes": str(3 * GiB), "memory.usage_in_bytes": str(2 * GiB),
                 "memory.stat": f"cache 1\ntotal_inactive_file {GiB // 2}\n"}
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    assert memory.cgroup_available(tmp_path / "proc", tmp_path / "sys") == 3 * GiB // 2  # 3 - 2 + 0.5 reclaimable


# ---- the pass-size rule ---------------------------------------------------------------------------------------

def test_pass_size_from_two_probes_within_the_budget_growing_at_most_fourfold():
    s = PassSizer(budget=1000, cap=64, base=100)
    assert s.size() == 1
    s.record(1, 200)
    assert s.size() == 2
    s.record(2, 250)  # 50 per item, 50 fixed: 0.9 x 1000 - 100 - 50 = 750 of room, 15 items; 4 x 2 = 8 at most
    assert (s.per_item, s.fixed, s.size()) == (50, 50, 8)
    s.record(8, 600)  # above the prediction (550): 450 / 8 = 56.25 per item, 13 items fit
    assert s.per_item == 56.25 and s.size() == 13
    s.record(13, 500)  # below: nothing is lowered
    assert s.size() == 13
    assert s.failed(13) == 6 and s.size() == 6  # out of memory: half, and the new cap


def test_a_pass_within_memory_kept_from_larger_ones_raises_nothing():
    s = PassSizer(budget=1000, cap=64, base=100)
    s.record(1, 200, start=100)
    s.record(2, 250, start=200)
    assert s.size() == 8
    s.record(1, 600, start=600)  # a last pass of one, in the 600 the process still holds: no news
    assert s.per_item == 50 and s.size() == 8
    s.record(8, 600 + 20 * 2**20, start=600)  # one that grew the resident set above its start does count
    assert s.per_item > 50


def test_pass_size_with_noisy_probes_and_a_budget_below_one_item():
    s = PassSizer(budget=1000, cap=64, base=100)
    s.record(1, 300)
    s.record(2, 290)  # no increase: the first pass is taken as all per-item cost (200), no fixed part
    assert (s.per_item, s.fixed, s.size()) == (200, 0, 4)  # (900 - 100) // 200
    tight = PassSizer(budget=100, cap=64, base=400)  # nothing fits: one at a time, never zero
    tight.record(1, 500)
    tight.record(2, 600)
    assert tight.size() == 1
    assert PassSizer(budget=10**12, cap=5, base=0).size() == 1  # the probes first, whatever the budget


def test_the_meter_sees_a_tensor_allocated_inside_its_window():
    meter = MemoryMeter(torch.device("cpu"))
    try:
        with meter.window() as outer:
            with meter.window() as inner:
                x = torch.ones(200 * MiB // 4)  # 200 MiB, touched
                del x
            with meter.window() as after:
                pass
    finally:
        meter.close()
    assert inner.increment > 150 * MiB
    assert outer.peak >= inner.peak and after.peak < inner.peak


# ---- out of memory inside a pass ------------------------------------------------------------------------------

KERNEL = ["--dataset", "MetaDigits", "--ntk_type", "MetaNTK_anl", "--ntk_channels", "4", "--ntk_layers", "2",
          "--image_size", "8", "--batch_size", "2", "--n_ways", "2", "--repeat", "2", "--prune_number", "1",
          "--lr_batch_size", "50", "--lr_batches", "1", "--device", "cpu", "--rand_seed", "3"]


@pytest.fixture
def fail_passes(monkeypatch):
    """``fail_passes({2, 5})``: the kernel passes with those numbers (1-based) raise the CPU allocator's error."""
    real = scoring.gram_blocks
    calls = {"n": 0}

    def arm(numbers):
        def gram_blocks(*a, **k):
            calls["n"] += 1
            if calls["n"] in numbers:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                   "memory: you tried to allocate 123456789 bytes. Error code 12")
            return real(*a, **k)

        monkeypatch.setattr(scoring, "gram_blocks", gram_blocks)
        return calls

    return arm


@pytest.mark.usefixtures("two_ops")
def test_out_of_memory_in_the_second_pass_splits_it_with_the_same_history(fail_passes, tmp_path):
    argv = [*KERNEL, "--memory_budget", "64GB"]  # passes of 1 and 2 (the probes), then up to 8, 32, ...
    assert prune_metantknas.main([*argv, "--save_dir", str(tmp_path / "ref")]) == 0
    ref = [json.loads(line) for line in (tmp_path / "ref" / "history.jsonl").read_text().splitlines()]
    first_round = ref[0][MEASURED_KEY]["passes"]
    assert ref[1][MEASURED_KEY]["pass_size"] > 2
    fail_passes({first_round + 2})  # the second pass of the second round
    assert prune_metantknas.main([*argv, "--save_dir", str(tmp_path / "oom")]) == 0
    oom = [json.loads(line) for line in (tmp_path / "oom" / "history.jsonl").read_text().splitlines()]
    assert [r[MEASURED_KEY]["oom_splits"] for r in oom] == [0, 1]
    assert [r[MEASURED_KEY]["oom_splits"] for r in ref] == [0, 0]
    assert oom[1][MEASURED_KEY]["passes"] > ref[1][MEASURED_KEY]["passes"]
    # another pass size: κ's last digits may move on some CPUs (tests/histories.py), nothing else
    assert_same_scores(tmp_path / "oom" / "history.jsonl", tmp_path / "ref" / "history.jsonl")
    assert (tmp_path / "oom" / "genotype.json").read_bytes() == (tmp_path / "ref" / "genotype.json").read_bytes()
    log = (tmp_path / "oom" / "search.log").read_text()
    assert "out of memory in a pass of " in log and "architectures (" in log and "retrying with " in log
    assert "1 out-of-memory splits" in log


@pytest.mark.usefixtures("two_ops")
def test_out_of_memory_with_one_architecture_is_exit_4_on_one_line(fail_passes, capsys, tmp_path):
    fail_passes(set(range(1, 100)))
    assert prune_metantknas.main([*KERNEL, "--save_dir", str(tmp_path / "run")]) == 4
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]  # in-process: the log is on stderr too
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert "out of memory on the CPU scoring a single architecture" in line and "--batch_size" in line
    assert "re-running the same command resumes" in line


@pytest.mark.usefixtures("two_ops")
def test_a_resumed_search_may_change_its_budget(tmp_path):
    run = tmp_path / "run"
    assert prune_metantknas.main([*KERNEL, "--save_dir", str(run), "--memory_budget", "2GB"]) == 0
    assert prune_metantknas.main([*KERNEL, "--save_dir", str(run), "--memory_budget", "3GB", "--threads", "1"]) == 0


# ---- the budget, end to end -----------------------------------------------------------------------------------

# A tiny search at 32x32: a pass of 64 candidates would peak near 3.7 GiB (about 45 MiB each on a process of
# 0.9 GiB; measured), the budget lets about four through.
TINY_32 = ["--dataset", "MetaDigits", "--ntk_channels", "4", "--ntk_layers", "2", "--image_size", "32",
           "--batch_size", "2", "--n_ways", "2", "--repeat", "1", "--prune_number", "6", "--lr_batch_size", "100",
           "--lr_batches", "1", "--device", "cpu", "--rand_seed", "0"]
BUDGET = 1200 * MiB


def _peak_of(cmd) -> tuple[int, subprocess.CompletedProcess]:
    """Exit code and the resident high-water mark (bytes) of one child process."""
    with open(os.devnull, "w") as null:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=null, stderr=subprocess.PIPE, text=True)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024, subprocess.CompletedProcess(cmd, proc.returncode, "", err)


@pytest.mark.slow  # 22 s; the budget's pass sizing is covered by the fast tests above
def test_a_tiny_32x32_search_stays_within_its_budget(tmp_path):
    cmd = [sys.executable, str(REPO / "prune_metantknas.py"), *TINY_32, "--memory_budget", f"{BUDGET // MiB}MiB",
           "--save_dir", str(tmp_path / "run")]
    peak, proc = _peak_of(cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert peak < 1.15 * BUDGET, f"peak {peak / MiB:.0f} MiB against a budget of {BUDGET / MiB:.0f} MiB"
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert all(rec[MEASURED_KEY]["budget_bytes"] == BUDGET for rec in history)
    assert 1 < history[0][MEASURED_KEY]["pass_size"] < 64  # batched, and held below the cap by the budget
