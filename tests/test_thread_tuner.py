"""ThreadTuner (search_lib/utils.py): the thread count of the few-shot test's forward passes, chosen by
timing them. A fake clock plays a machine alone (two threads faster, both cores busy) and a machine shared
with another test (two threads get only part of their cores)."""

from __future__ import annotations

import pytest
import torch

from search_lib.utils import ThreadTuner, threads_fixed


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
        torch.set_num_threads(before)

