"""A search in its run folder: validate, set up or resume the folder, search, write the genotype.

The folder (`search_lib.core.run_dir`) holds ``config.json``, the state of the last finished round
(``state.json``, the one before as ``state.prev.json``), ``history.jsonl`` (one record per round),
``genotype.json`` (a `GenotypeRecord`), ``cost.json`` (the objectives and the seconds the search and each
objective took, summed over the rounds), ``search.log``, ``done``, ``search.png`` (drawn by
`search_lib.search.search_plot`) and ``passes.json`` (the kernel pass size the rounds learned, and the size of
a pass in progress, so that a re-run after the process was killed mid-pass starts below it). Running the same
command again resumes an interrupted search and reports a finished one.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from search_lib.core.errors import DataError, GenotypeError, UsageError, one_line
from search_lib.core.figures import draw_quietly
from search_lib.core.pass_sizing import PASSES_FILE
from search_lib.core.run_dir import RunDir, SavedState
from search_lib.core.session import RunSession, run_session
from search_lib.core.threads import threads_fixed
from search_lib.core.utils import atomic_write_json, draw_seed, read_jsonl
from search_lib.data import SplitData, load_split, sample_batch, sample_meta_batch
from search_lib.models.genotypes import Genotype, GenotypeRecord
from search_lib.models.space import DEFAULT_SPACE, SearchSpace
from search_lib.models.supernet import Supernet, replace_norm
from search_lib.search.pruning import MEASURED_KEY, PruningSearch
from search_lib.search.search_config import SearchConfig
from search_lib.search.search_plot import draw_search

log = logging.getLogger("metantknas.search")

SEARCH_LOG = "search.log"
COST_FILE = "cost.json"


def search_cost(cfg: SearchConfig, history: list[dict]) -> dict:
    """cost.json: the objectives, how they were combined, and the seconds of the rounds (each process's, summed
    over the processes that ran them when a search was resumed) and of each objective."""
    seconds: dict[str, float] = dict.fromkeys(cfg.objectives, 0.0)
    for record in history:
        for name, s in record.get(MEASURED_KEY, {}).get("objective_seconds", {}).items():
            seconds[name] = seconds.get(name, 0.0) + s
    return {"objectives": list(cfg.objectives), "combine": cfg.combine, "rounds": len(history),
            "seconds": round(sum(r.get(MEASURED_KEY, {}).get("seconds", 0.0) for r in history), 2),
            "objective_seconds": {k: round(v, 2) for k, v in seconds.items()}}


def search_run_dir(path) -> RunDir:
    """The run folder of a search: state.json (+ state.prev.json), history.jsonl, genotype.json, search.log."""
    return RunDir(path, SavedState("state.json", "state.prev.json", "search state",
                                   restart="starting again from round 0"),
                  outputs=("history.jsonl", "genotype.json", COST_FILE, "search.png", PASSES_FILE), log_name=SEARCH_LOG,
                  logger=log)


@dataclass
class SearchResult:
    genotype: Genotype
    save_dir: Path
    seed: int
    resumed_from_round: int
    already_done: bool
    space: SearchSpace = DEFAULT_SPACE

    @property
    def record(self) -> GenotypeRecord:
        return GenotypeRecord(self.genotype, self.space, self.seed)


def _check_network(cfg: SearchConfig) -> None:
    """Build the supernet without memory (meta device) and swap its norms: channel counts that the chosen
    normalisation cannot divide fail here, before anything is written, not when the scorer is built."""
    with torch.device("meta"):
        replace_norm(Supernet(cfg.ntk_channels, cfg.ntk_layers, 2, cfg.space, cfg.ntk_stemm, cfg.ntk_fsr),
                     cfg.norm_type)


def _check_inputs(cfg: SearchConfig) -> SplitData:
    """Check the network and load the data and draw one throwaway batch, so bad inputs fail before anything
    is written."""
    _check_network(cfg)
    split = load_split(cfg.data, cfg.data_path, "train")
    gen = np.random.default_rng(0)
    tf = cfg.input_transform()
    if cfg.meta:
        sample_meta_batch(split, 1, cfg.n_ways, cfg.n_shots, cfg.n_queries, tf, gen)
    else:
        if cfg.effective_batch_size > len(split):
            raise DataError(f"--batch_size {cfg.effective_batch_size} exceeds the {len(split)} training images of "
                            f"{cfg.dataset}; lower --batch_size")
        sample_batch(split, 2, tf, gen)
    return split


def _result(cfg: SearchConfig, geno: Genotype, save_dir: Path, start: int, done: bool) -> SearchResult:
    return SearchResult(geno, save_dir, cfg.rand_seed, start, done, cfg.space)


def run_search(cfg: SearchConfig) -> SearchResult:
    """Validate, set up (or resume) the run directory, search, write the outputs.

    Under torchrun every rank runs this: each scores its share of every round's candidates, every rank
    gets all the scores and prunes alike, and rank 0 alone writes the run folder and prints. The folder's
    lock is held from the first look (when the folder has a lock file) or the first write to the end; what was
    read before the lock could be taken is read again once it is held.
    """
    cfg.validate()
    # the thread count fixed at the start (--tune_threads: chosen by timing the passes); a folder another process
    # runs in: exit 2 at once
    with run_session(cfg.device, cfg.threads, run=search_run_dir(cfg.save_dir), overwrite=cfg.overwrite,
                     break_stale=cfg.break_stale_lock, deterministic=cfg.deterministic,
                     take_turns=cfg.take_turns) as session:
        return _run_search(cfg, session)


def _read_folder(cfg: SearchConfig, run: RunDir, main: bool) -> tuple[dict | None, SearchResult | None]:
    """The folder's recorded config (None: a new search) and, for a finished search, its result (reported);
    a recorded seed replaces a seed of -1."""
    save_dir = run.path
    old_cfg = None if cfg.overwrite else run.read_config()
    if old_cfg is None:
        return None, None
    try:
        old_seed = int(old_cfg.get("rand_seed", -1))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{save_dir}/config.json holds an invalid rand_seed ({one_line(exc, 100)}); use "
                         f"--overwrite or another --save_dir") from None
    if cfg.rand_seed == -1:  # resuming a run that drew its seed: reuse the recorded one
        cfg.rand_seed = old_seed
    run.check_config(SearchConfig.from_dict(old_cfg).result_dict(), cfg.result_dict(), what="a search")
    if not run.is_done():
        return old_cfg, None
    try:
        geno = GenotypeRecord.from_json((save_dir / "genotype.json").read_text()).genotype
    except (OSError, UnicodeDecodeError, GenotypeError) as exc:
        # the state says where the search ended: finishing it again only rewrites genotype.json
        if main:
            print(f"warning: {save_dir} is marked done but genotype.json is unreadable "
                  f"({one_line(exc, 100)}); rebuilding it from the saved state", file=sys.stderr)
        return old_cfg, None
    if main:
        print(f"search already finished in {save_dir} (use --overwrite to recompute)")
        print(f"genotype: {geno}")
    return old_cfg, _result(cfg, geno, save_dir, -1, True)


def _run_search(cfg: SearchConfig, session: RunSession) -> SearchResult:
    """`run_search` while this process holds (or is about to hold) the folder's lock."""
    run, world = session.run, session.world
    main = world.is_main
    save_dir = run.path
    asked_seed, checked = cfg.rand_seed, False
    while True:
        cfg.rand_seed = asked_seed
        old_cfg, finished = _read_folder(cfg, run, main)
        if finished is not None:
            return finished
        if not checked:
            _check_inputs(cfg)
            checked = True
        drawn = cfg.rand_seed == -1
        if drawn:  # drawn once, by rank 0, for every rank
            cfg.rand_seed = world.gather(draw_seed())[0]
        # the lock held from here to the end; read again when another process wrote the folder since the first look
        if not session.claim(overwrite=cfg.overwrite, log="metantknas", console=True, reread=True):
            break
    if main:
        run.write_config(cfg.to_dict())
    # `CandidateScorer`'s tuners (--tune_threads): κ's last digits may then follow the load (some CPUs)
    tuned = session.device.type == "cpu" and cfg.tune_threads and not threads_fixed(cfg.threads)
    session.record_provenance({"rand_seed": cfg.rand_seed}, {"mode": "tuned" if tuned else "fixed",
                                                               "load_dependent": tuned})
    search = PruningSearch(cfg, run, world, session.device)
    state = search.load_state() if old_cfg is not None else None
    start = state["round"] if state else 0
    log.info("search: %s, %s (%s), seed %d%s, device %s%s, save_dir %s%s", cfg.dataset, cfg.ntk_type,
             cfg.algorithm if cfg.meta else "images", cfg.rand_seed,
             " (drawn for --rand_seed -1, recorded in config.json)" if drawn else "", search.device,
             f" x {world.size} processes" if world.active else "", save_dir,
             f", resuming at round {start}" if state else "")
    geno = search.run(state)
    result = _result(cfg, geno, save_dir, start, False)
    if main:
        result.record.write(save_dir / "genotype.json")
        history = save_dir / "history.jsonl"  # absent when no round ran (a space with one genotype left)
        cost = search_cost(cfg, read_jsonl(history) if history.exists() else []) | {"turns": session.turns.record()}
        atomic_write_json(save_dir / COST_FILE, cost)
        log.info("search seconds: %.1f (%s)", cost["seconds"],
                 ", ".join(f"{k} {v:.1f}" for k, v in cost["objective_seconds"].items()))
        run.mark_done()
        draw_quietly(draw_search, save_dir, log)  # search.png; a failure is a warning, not a failed search
    log.info("genotype: %s", geno)
    log.info("outputs: %s (config.json, history.jsonl, genotype.json, cost.json, search.log, search.png)", save_dir)
    return result
