"""The proxy study (``python -m eval_lib.proxy_study``, `eval_lib.commands.study_command`): does the search's proxy
predict few-shot accuracy? (docs/method.md §9)

For a set of architectures (seeded random genotypes, the published ones, a search's genotype.json files)
it computes the proxies of `eval_lib.study.proxies` at initialisation (the search's κ and linear regions, size,
the zero-cost proxies of the literature), trains and few-shot tests every architecture
(`eval_lib.train.training_run.train_and_evaluate`), and measures how well each proxy, and two combinations of them,
rank the architectures by test accuracy, also once size is held fixed (`eval_lib.study.study_stats`).

    python -m eval_lib.proxy_study --dataset MetaDigits --n_archs 12 --save_dir runs/proxy_study \\
        --ntk_channels 4 --image_size 16 --batch_size 2 --repeat 2 --aug_epochs 4 --aug_eval_splits test

Files of a study folder (``--save_dir``):

    config.json               the flags (--aug_* included); compared when the folder is used again
    archs/<id>/proxies.json   the proxies of one architecture (kept while its training runs)
    archs/<id>/train/         its training and few-shot test (a resumable training run folder)
    archs/<id>/train_s<k>/    with --train_seeds K > 1: its training with the (k+1)-th seed, k = 1 .. K-1
                              (`eval_lib.study.study_trainings`)
    archs/<id>/record.json    its record, written when it is finished (with K > 1: every training's
                              accuracy under "trainings", their mean and spread under "accuracy")
    searches/<slug>/          with --search_objectives: one search per item (search/), its genotype's trainings
                              (train/, train_s<k>/) and its record.json (`eval_lib.study.study_searches`)
    study.jsonl               the records in id order
    summary.json              per proxy and shots: τ, ρ, partial τ and ρ given #params, 95% intervals,
                              top-k hit rates, the fraction of the ceiling; cost per architecture;
                              proxy-vs-proxy rank correlations; per architecture the mean and spread of its
                              accuracy; the seed-to-seed ceiling (None with --train_seeds 1)
    summary.txt               the same as the printed table
    study.png                 each proxy against the 5-shot test accuracy; τ and partial τ bars with the
                              ceiling; heatmap; with --search_objectives each search's accuracy against its
                              seconds beside the random architectures' range
    (summary.json's "searches": per item its genotype, seconds, mean accuracy with interval, percentile)
    study.log                 the log
    done                      every architecture has a record and the summary is written

Re-running the same command continues with the next architecture without a record (an interrupted
training resumes at its last epoch). A larger --train_seeds on an existing folder trains the missing seeds of
every architecture (its proxies and first trainings kept); a smaller one summarises the first trainings.
``--shard i/n`` processes the architectures whose index % n == i (and the searches whose index, counted on
after the architectures, is), so several processes (or GPUs) can share
one folder; whichever finds every record present writes the summary. ``--summarize`` rebuilds the summary
from the records there.

Locks (`search_lib.core.run_dir.FolderLock`): every process of a study holds the study folder's lock shared, so
``--overwrite`` (which needs it alone) is refused while any shard works; each architecture's folder is
held exclusively while one process studies it, and the others skip it, so two processes in one folder
(two shards, or the same command twice) never compute the same architecture; the summary is written under
a lock of its own (``.summary.lock``), waited for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time

from eval_lib.study.proxies import BaselineData, KernelProxies, alive_mask, baselines
from eval_lib.study.study_config import Arch, SearchItem, StudyConfig, architectures, result_keys
from eval_lib.study.study_plot import study_png
from eval_lib.study.study_searches import (
    SEARCHES_DIR,
    check_search_folder,
    read_search_record,
    study_search,
    summarize_searches,
)
from eval_lib.study.study_stats import summarize
from eval_lib.study.study_table import format_table
from eval_lib.study.study_trainings import (
    first_trainings,
    recorded_trainings,
    train_with_seeds,
    training_count,
    with_trainings,
)
from eval_lib.train.checkpoints import read_json
from eval_lib.train.training_run import TrainingData
from search_lib.core.errors import FolderInUse, UsageError
from search_lib.core.folder_lock import FolderLock, describe_holder, in_use_message
from search_lib.core.provenance import build_record
from search_lib.core.run_dir import RunDir, write_provenance
from search_lib.core.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, resolve_device, use_device

log = logging.getLogger("metantknas.study")

ARCHS_DIR = "archs"
SUMMARY_LOCK = ".summary.lock"
OUTPUTS = ("study.jsonl", "summary.json", "summary.txt", "study.png")
def study_run_dir(path) -> RunDir:
    """The study folder: config.json, the records under archs/, study.jsonl, summary.json, summary.txt, study.png,
    study.log (``--overwrite`` removes them all, the archs/ folder included)."""
    return RunDir(path, None, outputs=(*OUTPUTS, ARCHS_DIR, SEARCHES_DIR), log_name="study.log", logger=log)


class StudyWork:
    """What studying an architecture needs, loaded once: the scorers, the baselines' batch, the device."""

    def __init__(self, cfg: StudyConfig, first: Arch):
        self.cfg = cfg
        self.device = resolve_device(cfg.proxy.device)
        use_device(self.device)  # its trainings make it current too (run_session), but the proxies come first
        probe = cfg.train_config(first.genotype, "unused")
        TrainingData.load(probe)  # the training data and its test episodes are usable: fails before any write
        self.data = BaselineData.load(probe, cfg.seed)
        self.kernels = KernelProxies(cfg.search_config(), self.device)

    def proxies(self, arch: Arch, folder) -> dict:
        """The proxies of ``arch`` (computed, or read back from its proxies.json after an interruption)."""
        cached = read_json(folder / "proxies.json")
        if cached is not None and cached.get("genotype") == str(arch.genotype):
            return cached
        t0 = time.time()
        proxies, sentinels = self.kernels.score(alive_mask(arch.genotype, self.cfg.proxy.space), arch.id)
        t1 = time.time()
        cost = dict(self.kernels.last_cost_s)
        base = baselines(arch.genotype, self.cfg.train_config(arch.genotype, "unused"), self.data, self.device,
                         zero_cost=self.cfg.zero_cost_proxies, costs=cost, context=arch.id)
        out = {"genotype": str(arch.genotype), "proxies": proxies, "kappa_sentinels": sentinels, "baselines": base,
               "timings": {"proxies_s": t1 - t0, "baselines_s": time.time() - t1, "proxy_s": cost}}
        atomic_write_json(folder / "proxies.json", out)
        return out

    def study(self, arch: Arch, folder, record: dict | None = None) -> dict:
        """Proxies, trainings and few-shot tests of one architecture: its record. A ``record`` of fewer trainings
        than --train_seeds (the folder was run with a smaller one) keeps its proxies and trainings and gains
        the missing ones."""
        if record is None:
            measured = self.proxies(arch, folder)
            done: list[dict] = []
        else:
            measured = {k: record[k] for k in ("proxies", "kappa_sentinels", "baselines")}
            measured["timings"] = {k: record["timings"][k] for k in ("proxies_s", "baselines_s", "proxy_s")}
            done = recorded_trainings(record, self.cfg)
        trainings = train_with_seeds(self.cfg, arch.genotype, folder, root=folder.parent.parent, done=done,
                                     context=arch.id)
        for t in trainings[len(done):]:
            if t["params"] != measured["baselines"]["params"]:
                log.warning("%s: the trained network has %s parameters, the baseline network %s", arch.id,
                            t["params"], measured["baselines"]["params"])
        base = {"id": arch.id, "index": arch.index, "source": arch.source, "name": arch.name,
                "arch_seed": arch.arch_seed, "genotype": str(arch.genotype), "proxies": measured["proxies"],
                "kappa_sentinels": measured["kappa_sentinels"], "baselines": measured["baselines"],
                "accuracy": None, "train_dir": None, "timings": measured["timings"]}
        return with_trainings(base, trainings)


def read_record(run: RunDir, arch: Arch) -> dict | None:
    """The record of ``arch`` in the folder, None when it has none; UsageError when it holds another genotype."""
    record = read_json(run / ARCHS_DIR / arch.id / "record.json")
    if record is not None and record.get("genotype") != str(arch.genotype):
        raise UsageError(f"{run / ARCHS_DIR / arch.id / 'record.json'} holds another genotype than architecture "
                         f"{arch.id} of this study (a genotype file changed?); use --overwrite to start over")
    return record


def run_study(cfg: StudyConfig) -> int:
    """Study the architectures of this process's shard, then summarise once every record is present."""
    cfg.validate()
    run = study_run_dir(cfg.save_dir)
    run.lock.break_stale = cfg.proxy.break_stale_lock
    if cfg.summarize:
        return summarize_folder(run, cfg)
    archs = architectures(cfg)
    _hold_study(run, cfg, early=True)
    try:
        old = None if cfg.overwrite else run.read_config()
        if old is not None:
            run.check_config(result_keys(old), cfg.result_dict(), what="a proxy study")
        index, count = cfg.shard_index()
        todo = [a for a in archs if a.index % count == index
                and (cfg.overwrite or training_count(read_record(run, a)) < cfg.train_seeds)]
        searches = _searches_to_do(run, cfg, len(archs), (index, count))
        work = StudyWork(cfg, todo[0]) if todo else None  # loads the data: bad inputs fail before any write
        run.create()
        _hold_study(run, cfg)
        if cfg.overwrite:
            run.clear()
            run.hold(shared=True)  # the other shards may join from here on
        run.write_config(cfg.flags())
        if todo or searches:  # e.g. a larger --train_seeds on a finished folder: not finished until they are trained
            run.unmark_done()
        with run.attach_log("metantknas", console=True):
            log.info("proxy study: %d architectures, %s in this process%s, %s, save_dir %s", len(archs),
                     f"{len(todo)} to do" if todo else "none left", f" (shard {index}/{count})" if count > 1 else "",
                     "one training each" if cfg.train_seeds == 1 else
                     f"{cfg.train_seeds} trainings each (seeds {', '.join(map(str, cfg.training_seeds()))})",
                     run.path)
            if cfg.search_items():
                log.info("searches (--search_objectives): %s; %d to do in this process",
                         ", ".join(i.label for i in cfg.search_items()), len(searches))
            for n, arch in enumerate(todo, 1):
                _study_one(run, work, arch, f"[{n}/{len(todo)}]")
            for n, item in enumerate(searches, 1):
                _search_one(run, cfg, item, f"[search {n}/{len(searches)}]")
            return write_outputs(run, cfg, archs)
    finally:
        run.release()


def _hold_study(run: RunDir, cfg: StudyConfig, early: bool = False) -> None:
    """The study folder's lock: shared by the shards, alone for --overwrite (refused naming a busy shard). A
    shard studying an architecture also refuses --overwrite where the shards' shared hold does not reach (a
    network file system's lease is exclusive only)."""
    busy: list[dict] = []
    try:
        run.hold(early=early, shared=not cfg.overwrite, overwrite=cfg.overwrite)
        if cfg.overwrite and run.lock.held:
            busy = _busy_architectures(run)
            if busy:
                raise FolderInUse("a shard studies an architecture")
    except FolderInUse as exc:
        if not cfg.overwrite:
            raise
        run.release()
        busy = busy or _busy_architectures(run)
        who = f"shard {describe_holder(busy[0])}" if busy else "a shard between two architectures"
        raise FolderInUse(f"--save_dir {run.path} is in use by other processes of this proxy study ({who}); "
                          f"--overwrite is refused while they run (nothing was deleted); wait for them to finish "
                          f"(or stop them) and run the command again, or choose another --save_dir") from exc


def _busy_architectures(run: RunDir) -> list[dict]:
    """The holders of the architecture (and search) folders another process studies now (a probe: no lock is
    taken)."""
    folders = sorted((run / ARCHS_DIR).glob("*")) + sorted((run / SEARCHES_DIR).glob("*"))
    return [h for h in (FolderLock(d).holder() for d in folders) if h is not None]


def _searches_to_do(run: RunDir, cfg: StudyConfig, n_archs: int, shard: tuple[int, int]) -> list[SearchItem]:
    """The searches of this shard without a record of --train_seeds trainings; every search folder's settings
    checked first (a UsageError before any write)."""
    index, count = shard
    items = cfg.search_items()
    if not cfg.overwrite:
        for item in items:
            check_search_folder(cfg, item, run / SEARCHES_DIR / item.slug)
    return [i for i in items if (n_archs + i.index) % count == index
            and (cfg.overwrite or training_count(read_search_record(run / SEARCHES_DIR / i.slug, i))
                 < cfg.train_seeds)]


@contextlib.contextmanager
def _unit_held(run: RunDir, folder, step: str, label: str):
    """Hold the lock of a unit of work's folder (an architecture, a search) for the block; yields False, having
    said so, when another process holds it: the unit is then skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(folder, break_stale=run.lock.break_stale)
    holder = lock.acquire()
    if holder is not None:
        log.info("%s %s: another process works on it (%s); skipped", step, label, describe_holder(holder))
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _search_one(run: RunDir, cfg: StudyConfig, item: SearchItem, step: str) -> None:
    """Search with ``item``'s objectives and train its genotype, holding its folder's lock; skip it when another
    process holds it or has finished it."""
    folder = run / SEARCHES_DIR / item.slug
    with _unit_held(run, folder, step, item.label) as held:
        old = None if not held or cfg.overwrite else read_search_record(folder, item)
        if not held or _finished(old, cfg, step, item.label):
            return
        log.info("%s search with %s (%s)%s", step, item.label, "log-rank sum" if item.combine == "log_rank" else
                 "ranks summed" if len(item.objectives) > 1 else "alone", _adding(old))
        record = study_search(cfg, item, folder, run.path, old)
        atomic_write_json(folder / "record.json", record)
        acc = ", ".join(f"{s}-shot {r['mean']:.2f}" for s, r in record["accuracy"]["test"].items())
        log.info("%s %s: %s; test %s (search %.1f s)", step, item.label, record["genotype"], acc,
                 record["timings"]["search_s"])


def _study_one(run: RunDir, work: StudyWork, arch: Arch, step: str) -> None:
    """Study ``arch`` holding its folder's lock; skip it when another process holds it or has finished it."""
    folder = run / ARCHS_DIR / arch.id
    with _unit_held(run, folder, step, arch.id) as held:
        old = None if not held or work.cfg.overwrite else read_record(run, arch)
        if not held or _finished(old, work.cfg, step, arch.id):
            return
        log.info("%s %s: %s%s", step, arch.id, arch.genotype, _adding(old))
        seeds = {"seed": work.cfg.seed, "arch_seed": arch.arch_seed, "training_seeds": work.cfg.training_seeds()}
        write_provenance(folder, build_record(work.device, {"mode": "fixed"}, seeds, work.cfg.proxy.deterministic),
                         log)  # its proxies' (each training writes its own in its folder)
        record = work.study(arch, folder, old)
        atomic_write_json(folder / "record.json", record)
        log.info("%s %s: %s", step, arch.id, _brief(record))


def _finished(old: dict | None, cfg: StudyConfig, step: str, label: str) -> bool:
    """True (said) when a unit's record already has this study's trainings: another process finished it since
    the list of work was made."""
    if training_count(old) >= cfg.train_seeds:
        log.info("%s %s: finished by another process; skipped", step, label)
        return True
    return False


def _adding(old: dict | None) -> str:
    return "" if old is None else f" (its record has {training_count(old)} training(s); adding the others)"


def _brief(record: dict) -> str:
    p, t = record["proxies"], record["timings"]
    acc = ", ".join(f"{s}-shot {r['mean']:.2f}" + (f" ± {r['std']:.2f}" if "std" in r else "")
                    for s, r in record["accuracy"]["test"].items())
    return (f"κ MAML {p['kappa_maml']['mean']:.4g}, regions {p['regions']['mean']:.0f}, "
            f"params {record['baselines']['params']}; test {acc} (proxies {t['proxies_s'] + t['baselines_s']:.1f} s, "
            f"training {t['train_s']:.1f} s, test {t['test_s']:.1f} s)")


def write_outputs(run: RunDir, cfg: StudyConfig, archs: list[Arch], partial: bool = False) -> int:
    """study.jsonl, summary.json, summary.txt, study.png (and done) from the records, once all are present
    (or ``partial``); one process at a time (the summary's lock, waited for)."""
    lock = FolderLock(run.path, SUMMARY_LOCK, break_stale=run.lock.break_stale)
    holder = lock.acquire(wait=True)  # waits for a live holder; a stale lease (network file systems) is refused
    if holder is not None:
        raise FolderInUse(in_use_message(f"the summary of {run.path}", holder))
    try:
        return _write_outputs(run, cfg, archs, partial)
    finally:
        lock.release()


def _write_outputs(run: RunDir, cfg: StudyConfig, archs: list[Arch], partial: bool) -> int:
    # a record counts once it has the --train_seeds trainings of this study (those beyond are left out)
    records = [first_trainings(r, cfg) for r in (read_record(run, a) for a in archs)
               if training_count(r) >= cfg.train_seeds]
    items = cfg.search_items()
    searched = [first_trainings(r, cfg) for r in (read_search_record(run / SEARCHES_DIR / i.slug, i) for i in items)
                if training_count(r) >= cfg.train_seeds]
    if (len(records) < len(archs) or len(searched) < len(items)) and not partial:
        log.info("%d of %d architectures and %d of %d searches have records of %d training(s); the process that "
                 "finishes the last writes the summary (or run with --summarize)", len(records), len(archs),
                 len(searched), len(items), cfg.train_seeds)
        return 0
    if not records:
        raise UsageError(f"--save_dir {run.path} holds no architecture records of {cfg.train_seeds} training(s) yet; "
                         f"run the study first")
    shots = [str(s) for s in cfg.train_config(archs[0].genotype, "unused").n_shots]
    summary = summarize(records, shots=shots, top_k=cfg.top_k, seed=cfg.seed, n_resamples=cfg.bootstrap_resamples,
                        expected=len(archs), log_rank_members=cfg.log_rank_members,
                        training_seeds=cfg.training_seeds())
    if items:
        summary["searches"] = summarize_searches(searched, records, shots, cfg.train_seeds)
    atomic_write_text(run / "study.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    atomic_write_json(run / "summary.json", summary)
    table = format_table(summary)
    atomic_write_text(run / "summary.txt", table + "\n")
    atomic_write_bytes(run / "study.png", study_png(records, summary, "5" if "5" in shots else shots[-1]))
    if len(records) == len(archs) and len(searched) == len(items):
        run.mark_done()
    print(table)
    print(f"outputs: {run.path} (study.jsonl, summary.json, summary.txt, study.png)")
    sys.stdout.flush()
    return 0


def summarize_folder(run: RunDir, cfg: StudyConfig) -> int:
    """--summarize: the architectures of the recorded config; --top_k, --bootstrap_resamples and
    --log_rank_members of this command. It holds the study's lock as a shard does (an --overwrite cannot
    delete the records while it reads them)."""
    run.hold(early=True, shared=True)
    try:
        old = run.read_config()
        if old is None:
            raise UsageError(f"--save_dir {run.path} holds no proxy study (no config.json); run the study first")
        recorded = StudyConfig.from_flags(old)
        recorded.top_k, recorded.bootstrap_resamples = cfg.top_k, cfg.bootstrap_resamples
        recorded.log_rank_members = cfg.log_rank_members
        recorded.check_log_rank_members()
        return write_outputs(run, recorded, architectures(recorded), partial=True)
    finally:
        run.release()
