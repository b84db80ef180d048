"""Out of memory in all its faces (issue 26): the real messages of torch's allocators and of cuDNN, cuBLAS, cuSOLVER
and cuFFT are recognised and halve the pass that raised them; the failed pass's memory is freed outside the
``except`` block; the pass size a run learned, and the size of a pass that was running when the process was
killed (Linux's OOM killer sends SIGKILL: nothing to catch), are kept in the run folder, so the re-run starts
below it and ends with the same genotype.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from histories import assert_same_scores
from test_batch_runs import ENV, REPO, two_ops  # noqa: F401  (two_ops is a fixture)
from test_memory import KERNEL

import prune_metantknas
from search_lib.core.pass_sizing import NOT_OUT_OF_MEMORY, OUT_OF_MEMORY, PassRecord, PassSizer, is_out_of_memory
from search_lib.data import load_split
from search_lib.search.kernels import KAPPA_SENTINEL, condition_number
from search_lib.search.pruning import MEASURED_KEY
from search_lib.search.scoring import CandidateScorer, PassCount
from search_lib.search.search_config import SearchConfig

FACES = [pytest.param(source, message, id=f"{i}-{source.split()[0]}") for i, (_, source, message)
         in enumerate(OUT_OF_MEMORY)]


def _error(source: str, message: str) -> RuntimeError:
    """The exception as torch raises it: the caching allocator's own class, cuSOLVER's as a LinAlgError."""
    if source.startswith("torch's CUDA"):
        return torch.cuda.OutOfMemoryError(message)
    if source.startswith("cuSOLVER"):
        return torch.linalg.LinAlgError(message)
    return RuntimeError(message)


@pytest.mark.parametrize("source, message", FACES)
def test_every_face_of_out_of_memory_is_recognised(source, message):
    assert is_out_of_memory(_error(source, message)) and is_out_of_memory(RuntimeError(message))


@pytest.mark.parametrize("message", NOT_OUT_OF_MEMORY)
def test_other_failures_of_the_libraries_are_not_out_of_memory(message):
    assert not is_out_of_memory(RuntimeError(message))


def test_the_eigen_solver_without_memory_is_no_sentinel(monkeypatch):
    """cuSOLVER failing to allocate must halve the pass, not turn into the singular kernel's κ."""
    def no_memory(k):
        raise torch.linalg.LinAlgError(OUT_OF_MEMORY[6][2])

    monkeypatch.setattr(torch.linalg, "eigvalsh", no_memory)
    with pytest.raises(torch.linalg.LinAlgError, match="CUSOLVER_STATUS_ALLOC_FAILED"):
        condition_number(torch.eye(3))

    def diverged(k):
        raise torch.linalg.LinAlgError(NOT_OUT_OF_MEMORY[-1])

    monkeypatch.setattr(torch.linalg, "eigvalsh", diverged)
    assert condition_number(torch.eye(3)) == KAPPA_SENTINEL


# ---- the back-off ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scorer():
    cfg = SearchConfig(dataset="MetaDigits", ntk_channels=4, ntk_layers=2, image_size=8, batch_size=2, n_ways=2,
                       repeat=1, regions_batches=1, regions_batch_size=50, rand_seed=0, device="cpu",
                       memory_budget="64GB").validate()
    split = load_split(cfg.data, None, "train")
    scorer = CandidateScorer(cfg, split, torch.device("cpu"), len(split.class_ids))
    scorer.begin_repeat(0)
    yield scorer
    scorer.end_repeat()
    scorer.close()


def _passes(scorer, monkeypatch, fail) -> list[int]:
    """Score 20 architectures in passes whose kappas are stand-ins; ``fail(k)`` raises in the first pass larger than
    two (the probes are 1 and 2). Returns the pass sizes."""
    scorer.sizer, scorer.passes = None, PassCount()
    sizes = []

    def kappas_many(alives, contexts):
        sizes.append(len(alives))
        if len(alives) > 2 and len([s for s in sizes if s > 2]) == 1:
            fail(len(alives))
        return [1.0] * len(alives)

    monkeypatch.setattr(scorer, "kappas_many", kappas_many)
    alive = np.ones((2, 9, 8), dtype=bool)
    assert scorer.kappas_measured([alive] * 20, ["x"] * 20) == [1.0] * 20
    return sizes


@pytest.mark.parametrize("source, message", FACES)
def test_each_face_halves_the_pass_that_raised_it(source, message, scorer, monkeypatch):
    def fail(k):
        raise _error(source, message)

    sizes = _passes(scorer, monkeypatch, fail)
    assert sizes[:3] == [1, 2, 8] and sizes[3] == 4 and max(sizes[4:]) <= 4
    assert scorer.passes.oom_splits == 1 and sum(sizes) - 8 == 20


def test_the_failed_pass_is_freed_before_the_cache_is_emptied(scorer, monkeypatch):
    """The error's traceback holds the failed pass's frames and their tensors: they must be gone when the memory is
    given back (the re-attach after the ``except`` block), not still referenced from inside it."""
    refs, freed = [], []

    def fail(k):
        work = torch.ones(1 << 16)  # the pass's tensors, referenced only by this frame
        refs.append(weakref.ref(work))
        raise RuntimeError(OUT_OF_MEMORY[3][2])

    real = scorer._reattach

    def reattach():
        freed.append(refs[-1]() is None)
        real()

    monkeypatch.setattr(scorer, "_reattach", reattach)
    _passes(scorer, monkeypatch, fail)
    assert freed == [True]


# ---- the pass size kept in the run folder -----------------------------------------------------------------

def test_the_record_keeps_what_was_learned_and_halves_a_pass_that_died(tmp_path, caplog):
    cpu = torch.device("cpu")
    sizer = PassSizer(budget=10 << 30, cap=64, base=1 << 30)
    record = PassRecord(tmp_path / "passes.json", cpu)
    for k, peak in ((1, 1100 << 20), (2, 1200 << 20)):
        record.starting(k, sizer)
        sizer.record(k, peak)
        record.finished(k, sizer)
    k = sizer.size()
    assert k == 8
    record.starting(k, sizer)  # ... and the process is killed during it
    saved = json.loads((tmp_path / "passes.json").read_text())
    assert saved["running"] == 8 and saved["device"] == "cpu" and saved["learned"]["per_item"] > 0
    fresh = PassSizer(budget=10 << 30, cap=64, base=1 << 30)
    PassRecord(tmp_path / "passes.json", cpu).restore(fresh)
    assert fresh.cap == 4 and fresh.size() == 4 and fresh.per_item == sizer.per_item  # no probing again
    assert "ended during a kernel pass of 8 architectures" in caplog.text
    assert json.loads((tmp_path / "passes.json").read_text())["running"] is None  # said once
    other = PassSizer(budget=10 << 30, cap=64, base=1 << 30)
    PassRecord(tmp_path / "passes.json", torch.device("meta")).restore(other)  # another device: nothing applies
    assert other.cap == 64 and other.per_item is None


KILLER = """
import os, signal, sys
import numpy as np
import prune_metantknas
import search_lib.search.pruning as pruning
import search_lib.search.scoring as scoring
from search_lib.models.ops import space_ops

ops = space_ops("darts_fewshot")
def initial_alive(self):  # the two_ops fixture's search
    alive = np.zeros((2, len(self.keys), len(self.ops)), dtype=bool)
    alive[:, :, [ops.index("skip_connect"), ops.index("sep_conv_3x3")]] = True
    return alive
pruning.PruningSearch.initial_alive = initial_alive
real = scoring.CandidateScorer.kappas_many
def kappas_many(self, alives, contexts):  # the OOM killer of a machine with room for 4 architectures a pass
    if len(alives) > 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, alives, contexts)
scoring.CandidateScorer.kappas_many = kappas_many
sys.exit(prune_metantknas.main(sys.argv[1:]))
"""


@pytest.mark.usefixtures("two_ops")
def test_a_search_killed_during_an_oversized_pass_restarts_below_it(tmp_path):
    argv = [*KERNEL, "--repeat", "1", "--memory_budget", "64GB"]  # far above what the machine gives (the killer's 4)
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLER, *argv, "--save_dir", str(run)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert json.loads((run / "passes.json").read_text())["running"] == 8  # probes of 1 and 2, then 8: killed
    assert prune_metantknas.main([*argv, "--save_dir", str(run)]) == 0
    assert "ended during a kernel pass of 8 architectures (killed for memory?); passes now take at most 4" in \
        (run / "search.log").read_text()
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert max(r[MEASURED_KEY]["pass_size"] for r in history) == 4
    assert prune_metantknas.main([*argv, "--save_dir", str(tmp_path / "ref")]) == 0  # undisturbed
    assert (run / "genotype.json").read_bytes() == (tmp_path / "ref" / "genotype.json").read_bytes()
    assert_same_scores(run / "history.jsonl", tmp_path / "ref" / "history.jsonl")  # passes of 4: tests/histories.py
