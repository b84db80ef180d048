"""The pruning-based search (docs/method.md §4), resumable round by round.

Each round scores every remaining op on every edge that still has a choice: the supernet without that
op is compared with the full supernet through Δκ = (κ_full - κ_without) / κ_full (the condition number
of the NTK or MetaNTK) and ΔR = (R_full - R_without) / R_full (linear regions). Unlike the original:

* Common random numbers. A repeat's initialisation seed and data batch are drawn once per round; the
  full network is scored once per repeat and every candidate of that repeat reuses the same weights
  and batch. Weights do not depend on the architecture parameters, so a candidate is scored by only
  swapping alphas: one kernel per candidate, not two, and no init noise in the ranking.
* Scoring a candidate is a pure function of (alphas, repeat seed, batch) (`CandidateScorer.score`).
* The state is saved atomically after every round, so a killed search resumes where it stopped.

The run folder around a search (config, resume, outputs) is `search_lib.search_run`.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .config import SearchConfig
from .data import SplitData, build_transform, load_split, sample_batch, sample_meta_batch
from .distributed import World
from .errors import one_line
from .genotypes import Genotype, genotype_from_alphas
from .kernels import (KAPPA_SENTINEL, MetaNTKModel, analytical_metantk, condition_number, gram_blocks, gram_by_group,
                      kernel_parameters, metantk_kernel_groups, per_sample_gradients, seeded_linear)
from .linear_regions import LinearRegionScorer, sample_crops
from .ranking import alphas_from_alive, dense_rank, repeat_seed, round_sig
from .run_dir import RunDir, SavedState
from .supernet import Supernet, init_weights, replace_norm
from .utils import atomic_write_json, atomic_write_text, resolve_device

log = logging.getLogger("metantknas.search")

CELLS = ("normal", "reduce")
CPU_PASS_BUDGET = 1 << 30  # bytes of per-sample gradients one pass may hold on the CPU
# Above this per architecture a CPU pass is compute-bound (C=16, 32x32: 2 per pass took 1.14x one at a time);
# below it (the demo's C=4) Python and hook overhead dominate and passes of many are 5-6x faster.
CPU_BATCHING_LIMIT = 64 << 20
MAX_PER_PASS = 64  # architectures per pass at most (beyond this the per-pass overhead is already amortised)
# Linear regions of this many architectures per pass of the thin network, whatever the kernel's pass holds: its
# activations are tiny, so one architecture per pass is all overhead (C=16 on 2 CPU cores: 196 ms per
# architecture alone, 88 ms at 8, 84 ms at 16, 85 ms at 32).
REGIONS_PER_PASS = 16
STATE_FILE, STATE_PREV = "state.json", "state.prev.json"
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Scoring


def search_transform(cfg: SearchConfig):
    return build_transform(cfg.transform, train=True, image_size=cfg.image_size, dataset=cfg.data)


@dataclass
class Candidate:
    cell: int  # 0 normal, 1 reduce
    edge: int
    op: int | None  # None: the whole edge (final edge-group phase)

    def without(self, alive: np.ndarray) -> np.ndarray:
        out = alive.copy()
        if self.op is None:
            out[self.cell, self.edge, :] = False
        else:
            out[self.cell, self.edge, self.op] = False
        return out


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


# --------------------------------------------------------------------------------------------------
# The search


class PruningSearch:
    """The rounds of one search; its state lives in the run folder's ``state.json``."""

    def __init__(self, cfg: SearchConfig, run_dir: RunDir | None = None, world: World | None = None,
                 device: torch.device | None = None):
        self.cfg = cfg
        self.ops = cfg.space.ops
        self.keys = cfg.space.keys
        self.run_dir = run_dir if run_dir is not None else search_run_dir(cfg.save_dir)
        self.world = world if world is not None else World()
        self.device = device if device is not None else resolve_device(cfg.device)

    # ---- state ----
    def initial_alive(self) -> np.ndarray:
        alive = np.ones((2, len(self.keys), len(self.ops)), dtype=bool)
        if "none" in self.ops:
            alive[:, :, self.ops.index("none")] = False
        return alive

    def save_state(self, state: dict) -> None:
        """state.json (atomically, the previous one kept as state.prev.json), then history.jsonl from it;
        rank 0 alone writes under torchrun."""
        if not self.world.is_main:
            return
        self.run_dir.save_state(lambda path: atomic_write_json(path, state))
        atomic_write_text(self.run_dir / "history.jsonl",
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in state["history"]))

    def load_state(self) -> dict | None:
        """The newest readable state (state.json, else state.prev.json); None to start from round 0.

        An unreadable file (truncated, not JSON, wrong shape) is reported, moved aside as ``*.corrupt``
        (so it is never rotated over the good previous one) and the previous one is tried.
        """
        state = self.run_dir.load_state(self._read_state) if self.world.is_main else None
        return self.world.gather(state)[0]  # rank 0 reads (and moves bad files aside); every rank resumes from it

    def _read_state(self, path) -> dict:
        """A state file of this search; ValueError unless it has this version, keys, shapes and phase."""
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError("not a search state of this version")
        if not {"round", "phase", "alive", "history"} <= set(state):
            raise ValueError("missing keys")
        shape = (2, len(self.keys), len(self.ops))
        if (state["phase"] not in ("ops", "edges", "done") or not isinstance(state["round"], int)
                or not isinstance(state["history"], list) or len(state["history"]) != state["round"]
                or np.asarray(state["alive"]).shape != shape):
            raise ValueError(f"inconsistent round, phase, history or alive (expected shape {shape})")
        return state

    # ---- one round ----
    def score_round(self, scorer: CandidateScorer, alive: np.ndarray, candidates: list[Candidate],
                    round_idx: int, phase: str) -> dict:
        cfg = self.cfg
        reps = cfg.repeat
        kfull, rfull = [], []
        dk = np.zeros((reps, len(candidates)))
        dr = np.zeros((reps, len(candidates)))
        kappas = np.zeros((reps, len(candidates)))
        regions = np.zeros((reps, len(candidates)), dtype=np.int64)
        sentinels: list[str] = []
        bar = tqdm(total=reps * (len(candidates) + 1), desc=f"round {round_idx} ({phase})", leave=False,
                   dynamic_ncols=True, disable=None if self.world.is_main else True)
        for rep in range(reps):
            seed = repeat_seed(cfg.rand_seed, round_idx, rep)
            # the full network first, then every candidate: all scored with the same weights and batch
            archs = [alive] + [cand.without(alive) for cand in candidates]
            labels = ["full network"] + [f"without {self.describe(cand)}" for cand in candidates]
            scorer.begin_repeat(seed)
            try:
                contexts = [f"round {round_idx} repeat {rep} {x}" for x in labels]
                mine = list(self.world.shard(len(archs)))  # under torchrun each rank scores its share
                scores = self.world.merge(len(archs), self.score_archs(
                    scorer, [archs[i] for i in mine], [contexts[i] for i in mine], bar))
            finally:
                scorer.end_repeat()
            (k0, r0), rest = scores[0], scores[1:]
            sentinels += [f"repeat {rep} {x}" for (k, _), x in zip(scores, labels) if k == KAPPA_SENTINEL]
            for c, (kc, rc) in enumerate(rest):
                kappas[rep, c], regions[rep, c] = kc, rc
                dk[rep, c] = round((k0 - kc) / k0, cfg.precision) if not cfg.only_lrs else 0.0
                dr[rep, c] = round((r0 - rc) / r0, cfg.precision) if r0 else 0.0
            kfull.append(k0)
            rfull.append(r0)
        bar.close()
        mean_dk = [round_sig(float(v), cfg.precision) for v in dk.mean(axis=0)]
        mean_dr = [round_sig(float(v), cfg.precision) for v in dr.mean(axis=0)]
        rank_k = dense_rank(mean_dk, descending=True) if not cfg.only_lrs else [0] * len(candidates)
        rank_r = dense_rank(mean_dr)
        records = []
        for c, cand in enumerate(candidates):
            records.append({
                "cell": CELLS[cand.cell], "edge": self.keys[cand.edge],
                "op": None if cand.op is None else self.ops[cand.op],
                "kappa": [None if cfg.only_lrs else float(v) for v in kappas[:, c]],
                "regions": [int(v) for v in regions[:, c]],
                "d_kappa": mean_dk[c], "d_regions": mean_dr[c],
                "rank_kappa": rank_k[c], "rank_regions": rank_r[c], "rank_sum": rank_k[c] + rank_r[c],
            })
        for s in sentinels:
            log.warning("round %d: singular or non-finite kernel (%s); κ set to %g", round_idx, s, KAPPA_SENTINEL)
        all_tied = len(candidates) > 1 and len({r["rank_sum"] for r in records}) == 1
        if all_tied:
            log.warning("round %d: every candidate has the same score; ties are broken by candidate order", round_idx)
        return {"round": round_idx, "phase": phase,
                "kappa_full": [None if cfg.only_lrs else float(v) for v in kfull],
                "regions_full": [int(v) for v in rfull], "candidates": records,
                "sentinel_events": len(sentinels), "all_tied": all_tied}

    def score_archs(self, scorer: CandidateScorer, archs: list[np.ndarray], contexts: list[str],
                     bar=None) -> list[tuple[float, int]]:
        """(κ, regions) of each architecture: one by one with ``--candidates_per_pass 1`` (the reference
        path); else the regions `REGIONS_PER_PASS` at a time and the kernels as many per pass as the memory
        rule allows (`CandidateScorer.candidates_per_pass`; one at a time for a large supernet on the CPU)."""
        if self.cfg.candidates_per_pass == 1:
            out = []
            for arch, ctx in zip(archs, contexts):
                out.append((scorer.kappa(arch, ctx), scorer.regions(arch)))
                if bar is not None:
                    bar.update(1)
            return out
        regions = scorer.regions_many(archs)
        per_pass = scorer.candidates_per_pass()
        kappas: list[float] = []
        for start in range(0, len(archs), per_pass):
            chunk, ctx = archs[start:start + per_pass], contexts[start:start + per_pass]
            kappas += [scorer.kappa(chunk[0], ctx[0])] if len(chunk) == 1 else scorer.kappas_many(chunk, ctx)
            if bar is not None:
                bar.update(len(chunk))
        return list(zip(kappas, regions))

    def describe(self, cand: Candidate) -> str:
        what = "edge" if cand.op is None else self.ops[cand.op]
        return f"{CELLS[cand.cell]} {self.keys[cand.edge]} {what}"

    def op_candidates(self, alive: np.ndarray) -> list[Candidate]:
        return [Candidate(c, e, o) for c in range(2) for e in range(len(self.keys)) if alive[c, e].sum() > 1
                for o in range(len(self.ops)) if alive[c, e, o]]

    def edge_candidates(self, alive: np.ndarray) -> list[Candidate]:
        out = []
        for c in range(2):
            for start, end in self.cfg.space.groups:
                live = [e for e in range(start, end) if alive[c, e].any()]
                if len(live) > 2:
                    out.extend(Candidate(c, e, None) for e in live)
        return out

    def prune_ops(self, alive: np.ndarray, candidates: list[Candidate], record: dict) -> np.ndarray:
        alive = alive.copy()
        by_edge: dict[tuple[int, int], list[int]] = {}
        for i, cand in enumerate(candidates):
            by_edge.setdefault((cand.cell, cand.edge), []).append(i)
        pruned = []
        for (c, e), idxs in by_edge.items():
            n = min(self.cfg.prune_number, int(alive[c, e].sum()) - 1)
            for i in sorted(idxs, key=lambda i: record["candidates"][i]["rank_sum"])[:n]:
                alive[c, e, candidates[i].op] = False
                record["candidates"][i]["pruned"] = True
                pruned.append(self.describe(candidates[i]))
        record["pruned"] = pruned
        return alive

    def prune_edges(self, alive: np.ndarray, candidates: list[Candidate], record: dict) -> np.ndarray:
        alive = alive.copy()
        groups = self.cfg.space.groups
        by_group: dict[tuple[int, int], list[int]] = {}
        for i, cand in enumerate(candidates):
            g = next(k for k, (s, t) in enumerate(groups) if s <= cand.edge < t)
            by_group.setdefault((cand.cell, g), []).append(i)
        pruned = []
        for idxs in by_group.values():
            keep = sorted(idxs, key=lambda i: -record["candidates"][i]["rank_sum"])[:2]
            for i in idxs:
                if i not in keep:
                    alive[candidates[i].cell, candidates[i].edge] = False
                    record["candidates"][i]["pruned"] = True
                    pruned.append(self.describe(candidates[i]))
        record["pruned"] = pruned
        return alive

    # ---- the whole search ----
    def run(self, state: dict | None = None) -> Genotype:
        cfg = self.cfg
        split = load_split(cfg.data, cfg.data_path, "train")
        num_classes = len(split.class_ids)
        scorer = CandidateScorer(cfg, split, self.device, num_classes)
        if state is None:
            state = {"version": STATE_VERSION, "round": 0, "phase": "ops",
                     "alive": self.initial_alive().tolist(), "history": []}
        alive = np.array(state["alive"], dtype=bool)
        while state["phase"] != "done":
            t0 = time.time()
            r = state["round"]
            phase = state["phase"]
            # ops rounds until every edge has one op, then one round choosing two input edges per node
            candidates, prune, next_phase = ((self.op_candidates, self.prune_ops, "edges") if phase == "ops"
                                             else (self.edge_candidates, self.prune_edges, "done"))
            cands = candidates(alive)
            if not cands:
                state["phase"] = next_phase
                continue
            record = self.score_round(scorer, alive, cands, r, phase)
            alive = prune(alive, cands, record)
            record["ops_left"] = int(alive.sum())
            state["history"].append(record)
            state["round"] = r + 1
            state["alive"] = alive.tolist()
            self.save_state(state)
            log.info("round %d (%s): %d candidates, pruned %d, %d ops left, %.1f s, %d singular kernels%s",
                     r, record["phase"], len(cands), len(record["pruned"]), record["ops_left"], time.time() - t0,
                     record["sentinel_events"], ", all scores tied" if record["all_tied"] else "")
        self.save_state(state)
        return genotype_from_alphas(*alphas_from_alive(alive), cfg.space.name, cfg.space.max_nodes)


# --------------------------------------------------------------------------------------------------
# The search's run folder

SEARCH_LOG = "search.log"


def search_run_dir(path) -> RunDir:
    """The run folder of a search: state.json (+ state.prev.json), history.jsonl, genotype.json, search.log."""
    return RunDir(path, SavedState(STATE_FILE, STATE_PREV, "search state", restart="starting again from round 0"),
                  outputs=("history.jsonl", "genotype.json", "search.png"), log_name=SEARCH_LOG, logger=log)
