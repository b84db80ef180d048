"""The pruning-based search (docs/method.md §4), resumable round by round.

Each round scores every remaining op on every edge that still has a choice: the supernet without that
op is compared with the full supernet through Δκ = (κ_full - κ_without) / κ_full (the condition number
of the NTK or MetaNTK) and ΔR = (R_full - R_without) / R_full (linear regions). Unlike the original:

* Common random numbers. A repeat's initialisation seed and data batch are drawn once per round; the
  full network is scored once per repeat and every candidate of that repeat reuses the same weights
  and batch. Weights do not depend on the architecture parameters, so a candidate is scored by only
  swapping alphas: one kernel per candidate, not two, and no init noise in the ranking.
* Scoring a candidate is a pure function of (alphas, repeat seed, batch) (`search_lib.search.scoring`).
* The state is saved atomically after every round, so a killed search resumes where it stopped.

Each round's record in history.jsonl holds, besides the scores, what the round measured on this run (pass
size, peak memory, budget, thread counts, seconds) under one key, ``measured`` (`MEASURED_KEY`): those
numbers differ from run to run, everything else is the same for the same seed and command on the CPU.
Compare histories with `scores_text`, which leaves that key out.

The run folder around a search (config, resume, outputs) is `search_lib.search.search_run`'s; it hands its
`RunDir` in.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from search_lib.core.distributed import World
from search_lib.core.memory import format_size, resolve_budget
from search_lib.core.pass_sizing import PASSES_FILE, PassRecord
from search_lib.core.run_dir import RunDir
from search_lib.core.utils import atomic_write_json, atomic_write_text, read_jsonl, resolve_device
from search_lib.data import load_split
from search_lib.models.genotypes import Genotype, genotype_from_alphas
from search_lib.search.kernels import KAPPA_SENTINEL
from search_lib.search.objectives import (
    KERNEL_OBJECTIVES,
    LOG_RANK_KEY,
    OBJECTIVES,
    ObjectiveClock,
    finite_or_none,
    importance_ranks,
    log_rank_sum,
    prune_key,
    relative_change,
)
from search_lib.search.ranking import alphas_from_alive, repeat_seed, round_sig
from search_lib.search.scoring import CandidateScorer
from search_lib.search.search_config import SearchConfig

log = logging.getLogger("metantknas.search")

CELLS = ("normal", "reduce")
STATE_VERSION = 1
MEASURED_KEY = "measured"  # the part of a history record that is measured on this run, not computed


def scores_text(path) -> str:
    """history.jsonl without each record's `MEASURED_KEY`, as the same JSON lines: two runs of the same search
    (interrupted or not, whatever their pass sizes and thread counts) give the same text."""
    return "".join(json.dumps({k: v for k, v in r.items() if k != MEASURED_KEY}, sort_keys=True) + "\n"
                   for r in read_jsonl(path))


@dataclass
class RoundValues:
    """What a round's repeats measured (`PruningSearch.score_round`): arrays of repeats x candidates, ``*full``."""
    kernel: bool  # κ and regions were measured
    proxies: list[str]  # the zero-cost objectives measured
    dk: np.ndarray
    dr: np.ndarray
    kappas: np.ndarray
    regions: np.ndarray
    kfull: list[float]
    rfull: list[int]
    pvalues: dict[str, np.ndarray]
    dp: dict[str, np.ndarray]
    pfull: dict[str, list[float]]
    seconds: dict[str, float]  # each objective's seconds in the round
    cand_seconds: dict[str, list[float]]  # a proxy's seconds per candidate, over the repeats
    sentinels: list[str]
    nonfinite: int


# --------------------------------------------------------------------------------------------------
# Candidates


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


# --------------------------------------------------------------------------------------------------
# The search


class PruningSearch:
    """The rounds of one search; its state lives in the run folder's ``state.json``."""

    def __init__(self, cfg: SearchConfig, run_dir: RunDir | None = None, world: World | None = None,
                 device: torch.device | None = None):
        self.cfg = cfg
        self.ops = cfg.space.ops
        self.keys = cfg.space.keys
        self.run_dir = run_dir  # None: rounds scored without a folder (no state is saved or read)
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
        if not self.world.is_main or self.run_dir is None:
            return
        self.run_dir.save_state(lambda path: atomic_write_json(path, state))
        atomic_write_text(self.run_dir / "history.jsonl",
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in state["history"]))

    def load_state(self) -> dict | None:
        """The newest readable state (state.json, else state.prev.json); None to start from round 0.

        An unreadable file (truncated, not JSON, wrong shape) is reported, moved aside as ``*.corrupt``
        (so it is never rotated over the good previous one) and the previous one is tried.
        """
        state = self.run_dir.load_state(self._read_state) if self.world.is_main and self.run_dir else None
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
        """Score every candidate of a round by each objective (κ and regions as the paper does, then each
        zero-cost proxy, `search_lib.search.objectives`) and combine the objectives' ranks."""
        cfg = self.cfg
        objectives = cfg.objectives
        kernel = any(o in KERNEL_OBJECTIVES for o in objectives)  # κ and regions: the paper's networks
        proxies = [o for o in objectives if o not in KERNEL_OBJECTIVES]
        reps, n = cfg.repeat, len(candidates)
        kfull, rfull = [], []
        dk, dr, kappas = (np.zeros((reps, n)) for _ in range(3))  # Δκ, Δregions, κ
        regions = np.zeros((reps, n), dtype=np.int64)
        pfull = {p: [] for p in proxies}
        pvalues = {p: np.zeros((reps, n)) for p in proxies}
        dp = {p: np.zeros((reps, n)) for p in proxies}
        seconds = dict.fromkeys(objectives, 0.0)  # each objective's seconds in this round
        cand_seconds = {p: [0.0] * n for p in proxies}  # a proxy's seconds per candidate, over the repeats
        sentinels: list[str] = []
        nonfinite = 0
        bar = tqdm(total=reps * (n + 1) * (int(kernel) + len(proxies)), desc=f"round {round_idx} ({phase})",
                   leave=False, dynamic_ncols=True, disable=None if self.world.is_main else True)
        for rep in range(reps):
            seed = repeat_seed(cfg.rand_seed, round_idx, rep)
            # the full network first, then every candidate: all scored with the same weights and batch
            archs = [alive] + [cand.without(alive) for cand in candidates]
            labels = ["full network"] + [f"without {self.describe(cand)}" for cand in candidates]
            mine = list(self.world.shard(len(archs)))  # under torchrun each rank scores its share
            scorer.begin_repeat(seed)
            try:
                if kernel:
                    contexts = [f"round {round_idx} repeat {rep} {x}" for x in labels]
                    scores = self.world.merge(len(archs), self.score_archs(
                        scorer, [archs[i] for i in mine], [contexts[i] for i in mine], bar, seconds))
                proxy_scores = self.world.merge(len(archs), [scorer.proxies(proxies, archs[i], bar)
                                                             for i in mine])
            finally:
                scorer.end_repeat()
            if kernel:
                (k0, r0), rest = scores[0], scores[1:]
                sentinels += [f"repeat {rep} {x}" for (k, _), x in zip(scores, labels) if k == KAPPA_SENTINEL]
                for c, (kc, rc) in enumerate(rest):
                    kappas[rep, c], regions[rep, c] = kc, rc
                    dk[rep, c] = relative_change(k0, kc, cfg.precision, OBJECTIVES["kappa"]) if cfg.needs_kappa else 0.0
                    dr[rep, c] = relative_change(r0, rc, cfg.precision, OBJECTIVES["regions"])
                kfull.append(k0)
                rfull.append(r0)
            for p in proxies:
                (v0, _), rest = proxy_scores[0][p], [x[p] for x in proxy_scores[1:]]
                pfull[p].append(v0)
                seconds[p] += sum(x[p][1] for x in proxy_scores)
                for c, (vc, sc) in enumerate(rest):
                    pvalues[p][rep, c] = vc
                    dp[p][rep, c] = relative_change(v0, vc, cfg.precision, OBJECTIVES[p])
                    cand_seconds[p][c] += sc
                nonfinite += sum(not math.isfinite(v) for v, _ in [proxy_scores[0][p], *rest])
        bar.close()
        return self._round_record(scorer, candidates, round_idx, phase, RoundValues(
            kernel=kernel, proxies=proxies, dk=dk, dr=dr, kappas=kappas, regions=regions, kfull=kfull, rfull=rfull,
            pvalues=pvalues, dp=dp, pfull=pfull, seconds=seconds, cand_seconds=cand_seconds, sentinels=sentinels,
            nonfinite=nonfinite))

    def _round_record(self, scorer: CandidateScorer, candidates: list[Candidate], round_idx: int, phase: str,
                      v: RoundValues) -> dict:
        """A round's record from what its repeats measured (`RoundValues`): the objectives' changes, ranks and
        combination."""
        cfg, objectives, n = self.cfg, self.cfg.objectives, len(candidates)
        kernel, proxies, pvalues, sentinels, nonfinite = v.kernel, v.proxies, v.pvalues, v.sentinels, v.nonfinite
        kappas, regions, dk, dr, dp = v.kappas, v.regions, v.dk, v.dr, v.dp
        changes: dict[str, list[float]] = {}
        ranks: dict[str, list[int]] = {}
        if kernel:
            changes["kappa"] = [round_sig(float(x), cfg.precision) for x in dk.mean(axis=0)]
            changes["regions"] = [round_sig(float(x), cfg.precision) for x in dr.mean(axis=0)]
            # an objective measured beside the one asked for, but not asked for, has rank 0 (as κ with --only_lrs)
            for o in KERNEL_OBJECTIVES:
                ranks[o] = importance_ranks(changes[o], OBJECTIVES[o]) if o in objectives else [0] * n
        for p in proxies:
            changes[p] = [round_sig(float(x), cfg.precision) for x in dp[p].mean(axis=0)]
            ranks[p] = importance_ranks(changes[p], OBJECTIVES[p])
        combined = log_rank_sum({o: changes[o] for o in objectives}) if cfg.combine == "log_rank" else None
        records = []
        for c, cand in enumerate(candidates):
            rec = {"cell": CELLS[cand.cell], "edge": self.keys[cand.edge],
                   "op": None if cand.op is None else self.ops[cand.op]}
            if kernel:
                rec.update({
                    "kappa": [float(x) if cfg.needs_kappa else None for x in kappas[:, c]],
                    "regions": [int(x) for x in regions[:, c]],
                    "d_kappa": changes["kappa"][c], "d_regions": changes["regions"][c],
                    "rank_kappa": ranks["kappa"][c], "rank_regions": ranks["regions"][c]})
            for p in proxies:
                rec.update({p: [finite_or_none(x) for x in pvalues[p][:, c]], f"d_{p}": changes[p][c],
                            f"rank_{p}": ranks[p][c]})
            # summed in OBJECTIVES' order, whatever the order of --objective
            rec["rank_sum"] = sum(ranks[o][c] for o in OBJECTIVES if o in ranks)
            if combined is not None:
                rec[LOG_RANK_KEY] = round_sig(combined[c], 12)
            records.append(rec)
        for s in sentinels:
            log.warning("round %d: singular or non-finite kernel (%s); κ set to %g", round_idx, s, KAPPA_SENTINEL)
        if nonfinite:
            log.warning("round %d: %d non-finite proxy values (null in history.jsonl); such a candidate counts as "
                        "the most important", round_idx, nonfinite)
        key = prune_key(cfg.combine)
        all_tied = len(candidates) > 1 and len({r[key] for r in records}) == 1
        if all_tied:
            log.warning("round %d: every candidate has the same score; ties are broken by candidate order", round_idx)
        out = {"round": round_idx, "phase": phase}
        if kernel:
            out.update({"kappa_full": [float(k) if cfg.needs_kappa else None for k in v.kfull],
                        "regions_full": [int(r) for r in v.rfull]})
        out["candidates"] = records
        for p in proxies:
            out[f"{p}_full"] = [finite_or_none(x) for x in v.pfull[p]]
        if proxies:
            out["nonfinite_events"] = nonfinite
        measured = scorer.measured()
        # the seconds each objective cost: kept with the other numbers measured on this run, never in the scores
        measured["objective_seconds"] = {o: round(x, 4) for o, x in v.seconds.items()}
        if proxies:
            measured["candidate_seconds"] = {p: [round(x, 4) for x in v.cand_seconds[p]] for p in proxies}
        out.update({"sentinel_events": len(sentinels), "all_tied": all_tied, MEASURED_KEY: measured})
        return out

    def score_archs(self, scorer: CandidateScorer, archs: list[np.ndarray], contexts: list[str],
                    bar=None, seconds: dict | None = None) -> list[tuple[float, int]]:
        """(κ, regions) of each architecture: one by one with ``--candidates_per_pass 1`` (the reference
        path); else the regions `REGIONS_PER_PASS` at a time and the kernels in passes sized by the measured
        memory (`CandidateScorer.kappas_measured`; one at a time for a large supernet on the CPU). The seconds
        of each are added to ``seconds`` (under "kappa" and "regions", when there)."""
        update = bar.update if bar is not None else None
        seconds = {} if seconds is None else seconds
        timer = ObjectiveClock(seconds)
        if self.cfg.candidates_per_pass == 1:
            out = []
            for arch, ctx in zip(archs, contexts):
                with timer("kappa"):
                    k = scorer.kappas_measured([arch], [ctx], update)[0]
                with timer("regions"):
                    out.append((k, scorer.regions(arch)))
            return out
        with timer("regions"):
            regions = scorer.regions_many(archs)
        with timer("kappa"):
            kappas = scorer.kappas_measured(archs, contexts, update)
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
        key = prune_key(self.cfg.combine)
        for (c, e), idxs in by_edge.items():
            n = min(self.cfg.prune_number, int(alive[c, e].sum()) - 1)
            for i in sorted(idxs, key=lambda i: record["candidates"][i][key])[:n]:
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
        key = prune_key(self.cfg.combine)
        for idxs in by_group.values():
            keep = sorted(idxs, key=lambda i: -record["candidates"][i][key])[:2]
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
        budget = resolve_budget(cfg.memory_budget, self.device)  # on CUDA: the free memory now, at the start
        # the pass size learned (and a pass a killed process died in) is kept in the folder; rank 0's sizes only
        record = (PassRecord(self.run_dir / PASSES_FILE, self.device) if self.run_dir is not None and
                  self.world.is_main else None)
        scorer = CandidateScorer(cfg, split, self.device, num_classes, budget, record)
        try:
            return self._rounds(scorer, state)
        finally:
            scorer.close()

    def _rounds(self, scorer: CandidateScorer, state: dict | None) -> Genotype:
        cfg = self.cfg
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
            with scorer.meter.window() as peak:  # the round's peak memory (its kernel passes measure their own)
                record = self.score_round(scorer, alive, cands, r, phase)
            alive = prune(alive, cands, record)
            record["ops_left"] = int(alive.sum())
            measured = record[MEASURED_KEY]  # this process's numbers (rank 0's under torchrun)
            measured.update(peak_bytes=peak.peak, seconds=round(time.time() - t0, 2))
            state["history"].append(record)
            state["round"] = r + 1
            state["alive"] = alive.tolist()
            self.save_state(state)
            log.info("round %d (%s): %d candidates, pruned %d, %d ops left, %.1f s, %d singular kernels%s; %s",
                     r, record["phase"], len(cands), len(record["pruned"]), record["ops_left"], measured["seconds"],
                     record["sentinel_events"], ", all scores tied" if record["all_tied"] else "", _brief(measured))
        self.save_state(state)
        return genotype_from_alphas(*alphas_from_alive(alive), cfg.space)


def _brief(measured: dict) -> str:
    """``up to 16 per pass, peak 1.21 GiB (budget 4.00 GiB), threads 2``: the measured part of a round's line."""
    threads = "/".join(sorted(measured["threads"], key=int, reverse=True)) or "-"
    split = f", {measured['oom_splits']} out-of-memory splits" if measured["oom_splits"] else ""
    return (f"up to {measured['pass_size']} per pass, peak {format_size(measured['peak_bytes'])} (budget "
            f"{format_size(measured['budget_bytes'])}){split}, threads {threads}")
