"""Scoring architectures of the supernet: κ of the NTK / MetaNTK and the linear-region count (docs/method.md §4).

`CandidateScorer` holds the kernel network (Opacus per-sample gradients) and the thin linear-region network
of a search and scores alive-op masks for one repeat at a time (one initialisation, one batch). Two paths
give the same scores: one architecture per pass (`kappa`, `regions`: the obviously correct reference) and
several per pass (`kappas_many`, `regions_many`, `score_many`: the batch repeated once per architecture,
each copy with its own op weights). Scoring is a pure function of (alphas, repeat seed, batch).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack

import numpy as np
import torch

from .config import SearchConfig
from .data import SplitData, build_transform, sample_batch, sample_meta_batch
from .errors import one_line
from .kernels import (KAPPA_SENTINEL, MetaNTKModel, analytical_metantk, condition_number, gram_blocks, gram_by_group,
                      kernel_parameters, metantk_kernel_groups, per_sample_gradients, seeded_linear)
from .linear_regions import LinearRegionScorer, sample_crops
from .ranking import alphas_from_alive
from .supernet import Supernet, init_weights, replace_norm

log = logging.getLogger("metantknas.search")

CPU_PASS_BUDGET = 1 << 30  # bytes of per-sample gradients one pass may hold on the CPU
# Above this per architecture a CPU pass is compute-bound (C=16, 32x32: 2 per pass took 1.14x one at a time);
# below it (the demo's C=4) Python and hook overhead dominate and passes of many are 5-6x faster.
CPU_BATCHING_LIMIT = 64 << 20
MAX_PER_PASS = 64  # architectures per pass at most (beyond this the per-pass overhead is already amortised)
# Linear regions of this many architectures per pass of the thin network, whatever the kernel's pass holds: its
# activations are tiny, so one architecture per pass is all overhead (C=16 on 2 CPU cores: 196 ms per
# architecture alone, 88 ms at 8, 84 ms at 16, 85 ms at 32).
REGIONS_PER_PASS = 16


def search_transform(cfg: SearchConfig):
    return build_transform(cfg.transform, train=True, image_size=cfg.image_size, dataset=cfg.data)


class CandidateScorer:
    """Holds the kernel and linear-region networks; scores alphas for one repeat at a time."""

    def __init__(self, cfg: SearchConfig, split: SplitData, device: torch.device, num_classes: int):
        self.cfg, self.split, self.device = cfg, split, device
        self.transform = search_transform(cfg)
        net = Supernet(cfg.ntk_channels, cfg.ntk_layers, num_classes, cfg.space.name, cfg.space.max_nodes,
                       cfg.ntk_stemm, cfg.ntk_fsr)
        replace_norm(net, cfg.norm_type)
        self.supernet = net
        self.model = MetaNTKModel(net, net.feature_dim, cfg.n_ways) if cfg.meta else net
        self.model.to(device).train(cfg.bn_mode == "train")
        if cfg.meta:
            self.groups = metantk_kernel_groups(self.model, cfg.params_types)
        else:
            self.groups = {"theta": kernel_parameters(self.model, cfg.params_types)}
        # Linear regions: a pool of resized training images, cropped anew in every repeat.
        pool_rng = np.random.default_rng([cfg.rand_seed, 7])
        n_pool = min(len(split), 1000)
        pool_idx = np.sort(pool_rng.choice(len(split), size=n_pool, replace=False))
        regions_tf = build_transform("TENAS", train=False, dataset=cfg.data)
        self.regions_pool = torch.stack([regions_tf(split.images[i]) for i in pool_idx])
        self.regions_scorer = LinearRegionScorer(sample_crops(self.regions_pool, 1, 1, cfg.regions_crop),
                                                 cfg.space.name, cfg.space.max_nodes, device,
                                                 train_mode=cfg.bn_mode == "train")
        self._stack: ExitStack | None = None
        self._inputs: torch.Tensor | None = None

    # ---- one repeat ----
    def begin_repeat(self, seed: int) -> None:
        cfg = self.cfg
        gen = np.random.default_rng(seed)
        if cfg.meta:
            x, _ = sample_meta_batch(self.split, cfg.effective_batch_size, cfg.n_ways, cfg.n_shots, cfg.n_queries,
                                     self.transform, gen)
        else:
            x, _ = sample_batch(self.split, cfg.effective_batch_size, self.transform, gen)
        self._inputs = x.to(self.device)
        self.regions_scorer.crops = [c.to(self.device) for c in sample_crops(
            self.regions_pool, cfg.regions_batches, cfg.regions_batch_size, cfg.regions_crop, seed)]
        init_weights(self.supernet, mode=cfg.init_mode, seed=seed)
        if cfg.meta:  # a fresh head, PyTorch's default init, seeded by the repeat
            fresh = seeded_linear(self.supernet.feature_dim, cfg.n_ways, seed)
            self.model.head.load_state_dict(fresh.state_dict())
        self.regions_scorer.reinit(seed)
        self._stack = ExitStack()
        if not cfg.only_lrs:
            self._gsm = self._stack.enter_context(per_sample_gradients(self.model, self.groups["theta"]))

    def end_repeat(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = None

    def kappa(self, alive: np.ndarray, context: str) -> float:
        """κ of one architecture: one per-sample-gradient pass of its own (the reference path)."""
        if self.cfg.only_lrs:
            return float("nan")
        self.supernet.set_alphas(*alphas_from_alive(alive))
        grams = gram_by_group(self._gsm, self._inputs, self.groups)
        return self._kappa_of(grams["theta"], grams.get("head"), context)

    def _kappa_of(self, theta: torch.Tensor, head: torch.Tensor | None, context: str) -> float:
        """κ of the NTK Θ, or of the analytical MetaNTK built from Θ (and the head kernel for ANIL)."""
        cfg = self.cfg
        if cfg.meta:
            per_task = cfg.n_ways
            k = theta if cfg.algorithm == "MAML" else head
            if not (torch.isfinite(theta).all() and torch.isfinite(k).all()):
                return condition_number(theta, context)  # NaN/Inf: the sentinel, logged (the solvers would fail)
            try:
                theta = analytical_metantk(theta, k, cfg.effective_batch_size, per_task * cfg.n_queries,
                                           per_task * cfg.n_shots, cfg.inner_lr_time, cfg.reg_coef)
            except RuntimeError as exc:  # torch.linalg failed to converge (a singular, ill-conditioned kernel)
                log.warning("MetaNTK failed (%s): %s; condition number set to %g", context, one_line(exc, 100),
                            KAPPA_SENTINEL)
                return KAPPA_SENTINEL
        return condition_number(theta, context)

    def regions(self, alive: np.ndarray) -> int:
        return self.regions_scorer.score(*alphas_from_alive(alive))

    def score_many(self, alives: list[np.ndarray], contexts: list[str]) -> list[tuple[float, int]]:
        """(κ, regions) of several architectures with one pass of each network (the fast path).

        The batch is repeated once per architecture and every copy runs with its own op weights
        (`Supernet.set_candidates`), so each architecture gets exactly the kernel and region count that
        `kappa` and `regions` give it alone, up to floating-point rounding.
        """
        return list(zip(self.kappas_many(alives, contexts), self.regions_many(alives)))

    @staticmethod
    def _stacked_alphas(alives: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        normal, reduce = (torch.stack(a) for a in zip(*(alphas_from_alive(a) for a in alives)))
        return normal, reduce

    def regions_many(self, alives: list[np.ndarray]) -> list[int]:
        """Region counts of several architectures, `REGIONS_PER_PASS` per pass of the thin network."""
        out: list[int] = []
        for start in range(0, len(alives), REGIONS_PER_PASS):
            out += self.regions_scorer.score_many(*self._stacked_alphas(alives[start:start + REGIONS_PER_PASS]))
        return out

    def kappas_many(self, alives: list[np.ndarray], contexts: list[str]) -> list[float]:
        """κ of several architectures from one per-sample-gradient pass over the batch repeated per architecture."""
        if self.cfg.only_lrs:
            return [float("nan")] * len(alives)
        normal, reduce = self._stacked_alphas(alives)
        n_arch, n = len(alives), self._inputs.shape[0]
        self.supernet.set_candidates(normal, reduce, n)
        try:
            grams = gram_blocks(self._gsm, self._inputs.repeat(n_arch, 1, 1, 1), self.groups, n_arch)
        finally:
            self.supernet.clear_candidates()
        head = grams.get("head")
        return [self._kappa_of(grams["theta"][b], None if head is None else head[b], contexts[b])
                for b in range(n_arch)]

    def candidates_per_pass(self) -> int:
        """Architectures per pass: their per-sample gradients (archs x batch x parameters x 4 B) fit a budget."""
        if self.cfg.candidates_per_pass > 0:
            return self.cfg.candidates_per_pass
        n_params = sum(p.numel() for p in self.groups["theta"]) if not self.cfg.only_lrs else 0
        per_arch = max(1, self._inputs.shape[0]) * max(n_params, 1) * 4 * 3  # grad samples, their copies, activations
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free // 3
        elif per_arch > CPU_BATCHING_LIMIT:  # a compute-bound pass on the CPU: batching only adds memory traffic
            return 1
        else:
            budget = CPU_PASS_BUDGET
        return int(max(1, min(MAX_PER_PASS, budget // per_arch)))
