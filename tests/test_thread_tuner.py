"""ThreadTuner (search_lib/core/threads.py): the thread count of the few-shot test's forward passes, chosen by
timing them. A fake clock plays a machine alone (two threads faster, both cores busy) and a machine shared
with another test (two threads get only part of their cores)."""

from __future__ import annotations

import json

import pytest
import torch

from search_lib.core.threads import ThreadTuner, configure_threads, threads_fixed


class _Machine:
    """Wall and CPU clocks advanced by each step: ``speed[n]`` seconds per unit of work with n threads,
    ``share[n]`` the fraction of its n cores the process gets."""

    def __init__(self, speed: dict, share: dict):
        self.speed, self.share = dict(speed), dict(share)
        self.wall = self.cpu = 0.0

    def run(self, tuner: ThreadTuner, steps: int, work: float = 64.0) -> None:
        for _ in range(steps):
            with tuner.step(work) as count:
                assert torch.get_num_threads() == count
                dt = self.speed[count] * work
                self.wall += dt
                self.cpu += dt * count * self.share[count]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _tuner(machine: _Machine, **kw) -> ThreadTuner:
    return ThreadTuner(timer=lambda: machine.wall, cpu_timer=lambda: machine.cpu, **kw)


def test_alone_it_keeps_two_threads_and_probes_less_and_less(two_threads):
    m = _Machine(speed={2: 0.5e-3, 1: 0.8e-3}, share={2: 1.0, 1: 1.0})
    tuner = _tuner(m, period=4, max_period=64)
    m.run(tuner, 300)
    assert tuner.best == 2 and tuner.history[:4] == [2, 2, 1, 1]
    ones = tuner.history.count(1)
    assert 4 <= ones <= 20  # a probe costs two steps; the period doubles while the choice holds
    assert tuner.period == 64
    tuner.close()
    assert torch.get_num_threads() == 2 and "2 threads: " in tuner.summary()


def test_sharing_its_cores_it_uses_one_thread_even_when_two_look_faster(two_threads):
    """Beside another busy process the two threads got 60% of their cores: one thread per process is
    what helps both, though this process's two-thread steps were not slower."""
    m = _Machine(speed={2: 0.7e-3, 1: 0.8e-3}, share={2: 0.6, 1: 1.0})
    tuner = _tuner(m, period=4)
    m.run(tuner, 100)
    assert tuner.best == 1 and tuner.history.count(1) > 80
    tuner.close()
    assert torch.get_num_threads() == 2  # restored


def test_it_follows_a_change_of_load(two_threads):
    m = _Machine(speed={2: 0.5e-3, 1: 0.8e-3}, share={2: 1.0, 1: 1.0})
    tuner = _tuner(m, period=4, max_period=8)
    m.run(tuner, 40)
    assert tuner.best == 2
    m.share[2] = 0.5  # another process starts
    m.run(tuner, 40)
    assert tuner.best == 1 and tuner.history[-20:].count(1) >= 16  # probes of two threads aside
    m.share[2] = 1.0  # and ends
    m.run(tuner, 40)
    assert tuner.best == 2


def test_slower_with_two_threads_it_uses_one(two_threads):
    m = _Machine(speed={2: 0.9e-3, 1: 0.8e-3}, share={2: 1.0, 1: 1.0})
    tuner = _tuner(m)
    m.run(tuner, 30)
    assert tuner.best == 1


def test_nothing_to_tune_with_one_thread_or_a_fixed_count(two_threads):
    m = _Machine(speed={2: 1e-3, 1: 1e-3}, share={2: 1.0, 1: 1.0})
    fixed = _tuner(m, enabled=False)
    m.run(fixed, 20)
    assert fixed.history == [2] * 20 and fixed.counts == [2]
    torch.set_num_threads(1)
    single = _tuner(m)
    m.run(single, 5)
    assert single.history == [1] * 5


def test_the_user_fixes_the_count_with_a_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("METANTKNAS_THREADS", raising=False)
    assert not threads_fixed(None) and threads_fixed(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_fixed(None)


def test_trusting_a_fair_share_skips_the_smaller_counts_alone_only(two_threads):
    alone = _Machine(speed={2: 0.5e-3, 1: 0.8e-3}, share={2: 0.97, 1: 1.0})
    tuner = _tuner(alone, period=4, trust_fair=True)
    alone.run(tuner, 40)
    assert tuner.history == [2] * 40  # probed every period, never with one thread
    shared = _Machine(speed={2: 0.7e-3, 1: 0.8e-3}, share={2: 0.6, 1: 1.0})
    tuner = _tuner(shared, period=4, trust_fair=True)
    shared.run(tuner, 40)
    assert tuner.best == 1 and tuner.history[:4] == [2, 2, 1, 1] and tuner.history.count(1) > 25


def test_four_cores_shared_by_two_runs_use_two_threads():
    """Candidates: all the threads, half of them, one. Two threads get their cores, four do not."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        m = _Machine(speed={4: 0.6e-3, 2: 0.7e-3, 1: 1.2e-3}, share={4: 0.55, 2: 0.98, 1: 1.0})
        tuner = _tuner(m, period=4)
        assert tuner.counts == [4, 2, 1]
        m.run(tuner, 60)
        assert tuner.best == 2
        tuner.close()
        assert torch.get_num_threads() == 4
    finally:
        configure_threads(threads=before)  # torch's and the BLAS pools, as the other tests expect them



# ---- the search's and the training's use ------------------------------------------------------------------------

SHARED = dict(speed={2: 0.7e-3, 1: 0.8e-3}, share={2: 0.6, 1: 1.0})  # beside another busy process
ALONE = dict(speed={2: 0.5e-3, 1: 0.8e-3}, share={2: 1.0, 1: 1.0})


def _advance(machine: _Machine, work: float) -> None:
    """The fake clocks after a step of ``work`` at the thread count torch has now."""
    count = torch.get_num_threads()
    dt = machine.speed[count] * work
    machine.wall += dt
    machine.cpu += dt * count * machine.share[count]


@pytest.fixture(scope="module")
def scorer_and_archs():
    from search_lib.data import load_split
    from search_lib.search.pruning import PruningSearch
    from search_lib.search.scoring import CandidateScorer
    from search_lib.search.search_config import SearchConfig

    cfg = SearchConfig(dataset="MetaDigits", ntk_channels=4, ntk_layers=2, image_size=8, batch_size=2, n_ways=3,
                       repeat=1, regions_batches=1, regions_batch_size=50, rand_seed=0, device="cpu",
                       candidates_per_pass=2).validate()
    split = load_split(cfg.data, None, "train")
    scorer = CandidateScorer(cfg, split, torch.device("cpu"), len(split.class_ids), budget=64 << 30)
    search = PruningSearch(cfg)
    alive = search.initial_alive()
    archs = [alive] + [c.without(alive) for c in search.op_candidates(alive)][:39]
    yield scorer, archs
    scorer.close()


@pytest.mark.parametrize("load, threads", [(SHARED, 1), (ALONE, 2)], ids=["shared", "alone"])
def test_the_search_passes_choose_their_threads(load, threads, scorer_and_archs, two_threads, monkeypatch):
    """The kernel passes of the search through their tuner; the kernels themselves are faked here (their numbers
    at each thread count: the next test), so only the choice is timed, on the fake clocks."""
    import search_lib.search.scoring as scoring

    scorer, archs = scorer_and_archs
    m = _Machine(**load)

    def gram_blocks(gsm, inputs, groups, n_blocks):
        _advance(m, n_blocks)
        m_ = inputs.shape[0] // n_blocks
        eye = torch.eye(m_, dtype=torch.float64).expand(n_blocks, m_, m_).clone()
        return {name: eye * (1 + torch.arange(n_blocks, dtype=torch.float64))[:, None, None] for name in groups}

    monkeypatch.setattr(scoring, "gram_blocks", gram_blocks)
    scorer.tuners["kernel"] = _tuner(m, period=4, probe_steps=1, trust_fair=True)  # as the scorer makes them
    scorer.sizer = None  # as at the start of a search: the memory probes first
    scorer.begin_repeat(0)
    try:
        kappas = scorer.kappas_measured(archs, ["t"] * len(archs))
    finally:
        scorer.end_repeat()
    tuner = scorer.tuners["kernel"]
    # passes of 1, 2, 2 x 18 and 1 architectures, every one timed: the first probes two threads; alone they got
    # their cores, so one thread is never tried; sharing they did not, so the second pass probes one, and the
    # choice holds from the third pass on (but for a probe of two threads now and then)
    assert len(kappas) == 40 and len(tuner.history) == 21 and tuner.best == threads
    if threads == 2:
        assert tuner.history == [2] * 21
    else:
        assert tuner.history[:2] == [2, 1] and tuner.history[2:].count(1) >= 16  # of the 19 after the probe
    tuner.close()
    assert torch.get_num_threads() == 2


def test_the_search_scores_the_same_at_any_thread_count_and_pass_size(scorer_and_archs, two_threads):
    scorer, archs = scorer_and_archs
    archs = archs[:6]
    scorer.begin_repeat(1)
    try:
        two = scorer.kappas_many(archs, ["t"] * 6) + [scorer.kappa(archs[0], "t")]
        torch.set_num_threads(1)
        one = scorer.kappas_many(archs[:2], ["t"] * 2) + scorer.kappas_many(archs[2:5], ["t"] * 3)
        one += scorer.kappas_many(archs[5:], ["t"]) + [scorer.kappa(archs[0], "t")]
    finally:
        scorer.end_repeat()
    assert one == two  # bit for bit: passes of 6 at two threads, of 2, 3 and 1 at one, and the reference path


@pytest.mark.parametrize("load, threads", [(SHARED, 1), (ALONE, 2)], ids=["shared", "alone"])
def test_the_training_steps_choose_their_threads(load, threads, two_threads, monkeypatch):
    import eval_lib.train.epoch as trainer

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(40)]
    m = _Machine(**load)
    real = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda mdl, x, *a: (real(mdl, x, *a), _advance(m, x.shape[0]))[0])
    tuner = _tuner(m, period=8)
    loss, acc = trainer.train_one_epoch(model, batches, optimizer, torch.device("cpu"), progress=False, tuner=tuner)
    assert len(tuner.history) == 40 and tuner.best == threads
    assert tuner.history.count(threads) >= 30
    assert loss > 0 and 0 <= acc <= 100


def test_the_training_and_the_search_tune_unless_the_count_is_fixed(monkeypatch, tmp_path):
    """Through the real entry points: every training step and every search pass goes through a tuner, which
    has a choice only when nothing fixes the count."""
    import eval_lib.train.training_run as train
    import eval_searched_arch
    import prune_metantknas
    from search_lib.search import scoring

    made = []

    class Recording(ThreadTuner):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(train, "ThreadTuner", Recording)
    monkeypatch.setattr(scoring, "ThreadTuner", Recording)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("METANTKNAS_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert eval_searched_arch.main(["--genotype", "mini-5cell-1", "--dataset", "Digits", "--init_channels", "2",
                                        "--layers", "2", "--epochs", "1", "--image_size", "8", "--batch_size", "128",
                                        "--n_shots", "1", "--n_queries", "2", "--n_test_runs", "2",
                                        "--n_aug_support_samples", "1", "--eval_splits", "test", "--num_workers", "0",
                                        "--device", "cpu", "--no-progress", "--threads", "1",
                                        "--save_dir", str(tmp_path / "fixed")]) == 0
        assert len(made) == 1 and made[0].counts == [1] and len(made[0].history) > 0  # --threads 1: no choice
        results = json.loads((tmp_path / "fixed" / "results.json").read_text())
        assert results["train"]["threads"] == {"1": len(made[0].history)}  # what the weights were trained at
        made.clear()
        assert prune_metantknas.main(["--dataset", "MetaDigits", "--ntk_channels", "4", "--ntk_layers", "2",
                                      "--image_size", "8", "--batch_size", "2", "--n_ways", "2", "--repeat", "1",
                                      "--prune_number", "7", "--regions_batch_size", "20", "--regions_batches", "1",
                                      "--device", "cpu", "--rand_seed", "0", "--save_dir", str(tmp_path / "s"),
                                      "--tune_threads"]) == 0
        kinds = [t for t in made if t.history]
        assert len(kinds) == 2 and all(len(t.counts) > 1 for t in kinds)  # kernel and regions passes, tuned
        made.clear()
        assert prune_metantknas.main(["--dataset", "MetaDigits", "--ntk_channels", "4", "--ntk_layers", "2",
                                      "--image_size", "8", "--batch_size", "2", "--n_ways", "2", "--repeat", "1",
                                      "--prune_number", "7", "--regions_batch_size", "20", "--regions_batches", "1",
                                      "--device", "cpu", "--rand_seed", "0", "--save_dir", str(tmp_path / "f")]) == 0
        kinds = [t for t in made if t.history]  # by default the count the search started with, kept
        assert len(kinds) == 2 and all(t.counts == [torch.get_num_threads()] for t in kinds)
    finally:
        configure_threads(threads=before)  # torch's and the BLAS pools, as the other tests expect them
