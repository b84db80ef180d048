"""Datasets and samplers over a loaded partition: whole-image training, few-shot episodes, search batches.

``SupervisedDataset`` (pre-training), ``EpisodeDataset`` (RFS ``MetaImageNet`` episodes) and the samplers of
the kernel search: ``sample_meta_batch`` (MetaNTK, sample order of docs/method.md §2) and ``sample_batch``
(plain NTK). Every sampler is deterministic given its seed / ``numpy.random.Generator``: the random
transforms run under ``torch.random.fork_rng`` with a torch seed drawn from that generator, so the global
torch RNG is neither used nor disturbed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from search_lib.core.errors import DataError, UsageError
from search_lib.data.files import SplitData, load_split
from search_lib.data.names import DatasetSpec, normalise_partition, resolve_dataset
from search_lib.data.transforms import apply_seeded, resolve_transform, torch_seed, transform_stack


class SupervisedDataset(torch.utils.data.Dataset):
    """Whole-image classification over one partition: items are ``(image, target, index)``."""

    def __init__(self, dataset: str | DatasetSpec, data_path, partition: str = "train", transform="A",
                 train: bool = True, image_size: int | None = None):
        spec = resolve_dataset(dataset)
        self.dataset = spec.key
        self.partition = normalise_partition(spec, partition)
        self.split = load_split(spec, data_path, self.partition)
        self.transform = resolve_transform(transform, train, image_size, spec)
        targets, self.num_classes = self.split.targets()
        targets.flags.writeable = False
        self.targets = targets

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        index = int(index)
        return self.transform(self.split.images[index]), int(self.targets[index]), index


def _check_positive(**values) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _check_episode_feasible(split: SplitData, n_ways: int, need: int, what: str) -> None:
    index = split.class_index()
    if len(index) < n_ways:
        raise DataError(f"{split.name} has {len(index)} classes but {what} needs n_ways={n_ways}; "
                        f"lower --n_ways or use a partition with more classes")
    for cls, idx in index.items():
        if len(idx) < need:
            raise DataError(f"{split.name}: class {cls} has {len(idx)} images but {what} needs {need} per class "
                            f"(n_shots + n_queries); lower --n_shots/--n_queries")


def _pick_task(split: SplitData, classes: np.ndarray, n_ways: int, n_shots: int, n_queries: int,
               rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Choose n_ways distinct classes; per class n_shots support + n_queries query indices, disjoint."""
    index = split.class_index()
    chosen = rng.choice(classes, size=n_ways, replace=False)
    support, query = [], []
    for cls in chosen:
        pool = index[int(cls)]
        pick = rng.choice(len(pool), size=n_shots + n_queries, replace=False)
        support.append(pool[pick[:n_shots]])
        query.append(pool[pick[n_shots:]])
    return support, query


class EpisodeDataset(torch.utils.data.Dataset):
    """RFS ``MetaImageNet`` episodes: ``__len__`` is ``n_test_runs``; item i is always the same episode.

    Item: ``(support_xs, support_ys, query_xs, query_ys)``; the support set (class-major, then shot) is tiled
    ``n_aug_support_samples`` times as in RFS (``[s_1..s_K, s_1..s_K, ...]``), each copy transformed with the
    *train* transform when ``train_transform`` is True (else the test transform); queries use the test
    transform. Labels are 0..n_ways-1 in the order the classes were drawn.
    """

    def __init__(self, dataset: str | DatasetSpec, data_path, partition: str = "test", n_ways: int = 5,
                 n_shots: int = 1, n_queries: int = 15, n_aug_support_samples: int = 5, n_test_runs: int = 600,
                 transform="A", image_size: int | None = None, seed: int = 0, train_transform: bool = True):
        _check_positive(n_ways=n_ways, n_shots=n_shots, n_queries=n_queries,
                        n_aug_support_samples=n_aug_support_samples, n_test_runs=n_test_runs)
        spec = resolve_dataset(dataset)
        self.dataset = spec.key
        self.partition = normalise_partition(spec, partition)
        self.split = load_split(spec, data_path, self.partition)
        self.n_ways, self.n_shots, self.n_queries = int(n_ways), int(n_shots), int(n_queries)
        self.n_aug_support_samples = int(n_aug_support_samples)
        self.n_test_runs = int(n_test_runs)
        self.seed = int(seed)
        if isinstance(transform, (tuple, list)) and len(transform) == 2:
            self.support_transform, self.query_transform = transform
        else:
            test_tf = resolve_transform(transform, False, image_size, spec)
            self.support_transform = (resolve_transform(transform, True, image_size, spec)
                                      if train_transform else test_tf)
            self.query_transform = test_tf
        _check_episode_feasible(self.split, self.n_ways, self.n_shots + self.n_queries,
                                f"{self.n_ways}-way {self.n_shots}-shot episodes with {self.n_queries} queries")
        self.classes = self.split.class_ids

    def __len__(self) -> int:
        return self.n_test_runs

    def episode_indices(self, item: int) -> tuple[list[int], list[int], np.ndarray]:
        """(support indices, query indices, chosen class ids) of episode ``item``, without transforming."""
        rng = self._rng(item)
        support, query = _pick_task(self.split, self.classes, self.n_ways, self.n_shots, self.n_queries, rng)
        chosen = np.array([int(self.split.labels[s[0]]) for s in support], dtype=np.int64)
        return [int(i) for s in support for i in s], [int(i) for q in query for i in q], chosen

    def _rng(self, item: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed & (2**64 - 1), int(item)]))

    def episode_plan(self, item: int) -> EpisodePlan:
        """What episode ``item`` is made of, without transforming: the tiled support indices and labels, the
        query indices and labels, and the torch seed of its support augmentations."""
        item = int(item)
        if not 0 <= item < self.n_test_runs:
            raise IndexError(f"episode {item} out of range 0..{self.n_test_runs - 1}")
        rng = self._rng(item)
        support, query = _pick_task(self.split, self.classes, self.n_ways, self.n_shots, self.n_queries, rng)
        seed = torch_seed(rng)
        s_idx = np.concatenate(support)
        q_idx = np.concatenate(query)
        s_lab = np.repeat(np.arange(self.n_ways), self.n_shots)
        q_lab = np.repeat(np.arange(self.n_ways), self.n_queries)
        return EpisodePlan(np.tile(s_idx, self.n_aug_support_samples), np.tile(s_lab, self.n_aug_support_samples),
                           q_idx, q_lab, seed)

    def support_images(self, plan: EpisodePlan) -> torch.Tensor:
        """The transformed support copies of an episode, exactly as ``__getitem__`` returns them (the same
        seeded torch generator, the same order)."""
        return apply_seeded(self.support_transform, self.split.images, plan.support_idx, plan.seed)

    def __getitem__(self, item: int):
        plan = self.episode_plan(item)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(plan.seed)
            support_xs = transform_stack(self.support_transform, self.split.images, plan.support_idx)
            query_xs = transform_stack(self.query_transform, self.split.images, plan.query_idx)
        return (support_xs, torch.from_numpy(plan.support_labels.astype(np.int64)),
                query_xs, torch.from_numpy(plan.query_labels.astype(np.int64)))


class EpisodeSubset(torch.utils.data.Dataset):
    """Some episodes of an `EpisodeDataset` (item i is episode ``indices[i]`` of the whole set), with the
    same interface, so that several processes can each test their share of the same fixed episodes."""

    def __init__(self, episodes: EpisodeDataset, indices):
        self.episodes = episodes
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getattr__(self, name: str):  # split, n_ways, n_shots, query_transform, support_images, ...
        if name == "episodes":  # not set yet (unpickling in a loader worker): no recursion
            raise AttributeError(name)
        return getattr(self.episodes, name)

    def episode_plan(self, item: int) -> EpisodePlan:
        return self.episodes.episode_plan(self.indices[item])

    def __getitem__(self, item: int):
        return self.episodes[self.indices[item]]


class EpisodePlan(NamedTuple):
    """An episode before transformation (``EpisodeDataset.episode_plan``)."""

    support_idx: np.ndarray     # image indices, the support set tiled n_aug_support_samples times
    support_labels: np.ndarray  # 0..n_ways-1, tiled likewise
    query_idx: np.ndarray
    query_labels: np.ndarray
    seed: int                   # torch seed of the support augmentations


# ----------------------------------------------------------------------------------------------------------
# search samplers
# ----------------------------------------------------------------------------------------------------------


def sample_meta_batch(split: SplitData, n_tasks: int, n_ways: int, n_shots: int, n_queries: int, transform,
                      generator: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A MetaNTK meta-batch of ``n_tasks`` tasks (distinct classes within a task, disjoint support/query).

    Returns ``(x, y)`` of ``n_tasks * n_ways * (n_queries + n_shots)`` items ordered: all queries (task 1,
    task 2, ...; class-major within a task), then all supports (task-major likewise); ``y`` holds the
    per-task labels 0..n_ways-1. ``transform`` is a callable or a transform name (its train variant).
    """
    _check_positive(n_tasks=n_tasks, n_ways=n_ways, n_shots=n_shots, n_queries=n_queries)
    if not isinstance(generator, np.random.Generator):
        raise UsageError("generator must be a numpy.random.Generator, e.g. numpy.random.default_rng(seed)")
    tf = resolve_transform(transform, True, None, split.dataset)
    _check_episode_feasible(split, n_ways, n_shots + n_queries,
                            f"meta-batches of {n_ways}-way {n_shots}-shot tasks with {n_queries} queries")
    classes = split.class_ids
    q_idx, q_lab, s_idx, s_lab = [], [], [], []
    for _ in range(int(n_tasks)):
        support, query = _pick_task(split, classes, n_ways, n_shots, n_queries, generator)
        for way, (s, q) in enumerate(zip(support, query)):
            q_idx.extend(int(i) for i in q)
            q_lab.extend([way] * len(q))
            s_idx.extend(int(i) for i in s)
            s_lab.extend([way] * len(s))
    x = apply_seeded(tf, split.images, q_idx + s_idx, torch_seed(generator))
    y = torch.tensor(q_lab + s_lab, dtype=torch.long)
    return x, y


def sample_batch(split: SplitData, batch_size: int, transform,
                 generator: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` distinct random images with their training targets (as ``SupervisedDataset``)."""
    _check_positive(batch_size=batch_size)
    if not isinstance(generator, np.random.Generator):
        raise UsageError("generator must be a numpy.random.Generator, e.g. numpy.random.default_rng(seed)")
    if batch_size > len(split):
        raise DataError(f"{split.name} has {len(split)} images, fewer than the batch size {batch_size}; "
                        f"lower --batch_size")
    tf = resolve_transform(transform, True, None, split.dataset)
    idx = generator.choice(len(split), size=int(batch_size), replace=False)
    x = apply_seeded(tf, split.images, [int(i) for i in idx], torch_seed(generator))
    targets, _ = split.targets()
    return x, torch.from_numpy(targets[idx].astype(np.int64))
