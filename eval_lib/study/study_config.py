"""The settings of a proxy study (`eval_lib.study.study_run`, docs/method.md §9) and the architectures it studies.

The command line is generated from three configs: the study's own fields (`StudyConfig`), the search's
fields under their own names (`SearchConfig`, less those that make no sense without a search; the study's
``--seed`` plays ``--rand_seed``'s role) and the search's ``--aug_*`` training flags (`TrainConfig`, turned
into a training config as ``--train_after_search`` does). ``config.json`` records these flags as given.

``--train_seeds K`` trains every architecture K times (`eval_lib.study.study_trainings`), with the seeds of
`StudyConfig.training_seeds`: the first is ``--aug_seed`` itself (0 by default, the seed of a study with one
training per architecture), the k-th after it the k-th child of numpy's ``SeedSequence(--aug_seed)``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval_lib.study.proxies import DEFAULT_LOG_RANK_MEMBERS, MEASURED, ZERO_COST_PROXIES, check_proxy_names
from eval_lib.train.after_search import TRAINING_FLAG_PREFIX, split_training_values, training_config
from eval_lib.train.train_config import TRAIN_AFTER_SEARCH_FLAGS, TrainConfig
from search_lib.core.command_line import field_default, flag, flag_fields
from search_lib.core.errors import GenotypeError, UsageError
from search_lib.core.utils import refuse_empty_paths
from search_lib.models.genotypes import PRESETS, Genotype, GenotypeRecord, random_genotype
from search_lib.search.objectives import parse_objectives
from search_lib.search.search_config import SearchConfig

# The search's flags that make no sense in a study: its own folder and seed (--save_dir, --seed), the objectives
# (--search_objectives names them per search), the training after the search (the study trains).
LEFT_OUT = ("save_dir", "overwrite", "train_after_search", "rand_seed", "only_lrs", "objective", "combine")
PROXY_FLAGS = tuple(f.name for f in flag_fields(SearchConfig) if f.name not in LEFT_OUT)
# The search's flags that only the searches of --search_objectives use (the proxies compute every kernel type,
# one architecture per pass, and prune nothing); each search's own folder records and checks them.
SEARCH_ONLY_FLAGS = ("prune_number", "ntk_type", "algorithm", "precision", "candidates_per_pass")
# Flags that do not change the architectures' records: a study folder may be resumed with other values.
# --train_seeds is among them because it only adds trainings (or leaves some out of the summary): a larger K on
# a finished folder trains the missing seeds of every architecture, its first trainings and proxies kept.
# --search_objectives only adds searches beside the architectures. "objective" and "combine" are keys of the
# config.json of a study written before --search_objectives, when the study took the search's flags of them.
NON_RESULT_KEYS = ("save_dir", "overwrite", "break_stale_lock", "shard", "summarize", "device", "top_k",
                   "bootstrap_resamples", "log_rank_members", "aug_num_workers", "aug_threads", "aug_episode_batch",
                   "train_seeds", "search_objectives", *SEARCH_ONLY_FLAGS, "objective", "combine")
SEARCH_ITEM_SEP, SEARCH_OBJECTIVE_JOIN, LOG_RANK_PREFIX = ",", "+", "log_rank:"

_ARCHS, _STUDY = "architectures", "study"


@dataclass
class StudyConfig:
    """Settings of one proxy study; each flag field is the flag of the same name of
    ``python -m eval_lib.proxy_study``."""

    n_archs: int = field(default=12, metadata=flag("seeded random genotypes of the search space", group=_ARCHS))
    published: bool = field(default=False, metadata=flag(
        "add the published genotypes (presets) that fit --search_space_name and --max_nodes", group=_ARCHS))
    genotype_files: list[str] = field(default_factory=list, metadata=flag(
        "genotype.json files (a search's) to add", type=str, nargs="+", metavar="F", group=_ARCHS))
    seed: int = field(default=0, metadata=flag(
        "seed of the random genotypes, of the proxies' repeats (the search's --rand_seed) and of the bootstrap",
        group=_STUDY))
    save_dir: str = field(default="runs/proxy_study", metadata=flag(
        "study folder; re-running the same command resumes it", group=_STUDY))
    zero_cost_proxies: list[str] = field(default_factory=lambda: list(ZERO_COST_PROXIES), metadata=flag(
        "the zero-cost proxies to compute on each network at initialisation", type=str, nargs="+", metavar="P",
        group=_STUDY))
    log_rank_members: list[str] = field(default_factory=lambda: list(DEFAULT_LOG_RANK_MEMBERS), metadata=flag(
        "the proxies whose ranks the log-rank combination (AZ-NAS's rule) sums", type=str, nargs="+",
        metavar="P", group=_STUDY))
    train_seeds: int = field(default=1, metadata=flag(
        "trainings per architecture, each with its own seed (the first: --aug_seed); with 2 or more the summary "
        "measures the seed-to-seed ceiling, how well one training ranks the architectures against another; "
        "a larger value on a finished folder trains only the missing seeds", group=_STUDY))
    search_objectives: str | None = field(default=None, metadata=flag(
        "one search per comma item, on the study's data with its --seed and the search's flags (--prune_number "
        "included), its genotype trained and tested with the study's training seeds beside the random "
        "architectures (default: no searches): an item is an objective of the search's --objective, several "
        "joined by + (their ranks summed, the search's rule), or log_rank:a+b+... (AZ-NAS's log-rank sum); e.g. "
        "kappa+regions,naswot,log_rank:naswot+zico+swap", type=str, metavar="ITEMS", group=_STUDY))
    top_k: int = field(default=3, metadata=flag("k of the top-k hit rate", group=_STUDY))
    bootstrap_resamples: int = field(default=9999, metadata=flag("bootstrap resamples per interval", group=_STUDY))
    shard: str | None = field(default=None, metadata=flag(
        "i/n: process only the architectures whose index %% n == i (shards may share --save_dir); default: all",
        type=str,
        group=_STUDY))
    summarize: bool = field(default=False, metadata=flag(
        "only rebuild study.jsonl, summary.json and study.png from the records in --save_dir", group=_STUDY))
    overwrite: bool = field(default=False, metadata=flag("discard the study in --save_dir and start over",
                                                         group=_STUDY))
    proxy: SearchConfig = field(default_factory=SearchConfig)  # the search's flags (PROXY_FLAGS)
    train: dict = field(default_factory=dict)  # the --aug_* values (None: eval_searched_arch.py's default)

    # ---- the flags as one flat dict (config.json) ----
    def flags(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in flag_fields(StudyConfig)}
        out.update({name: getattr(self.proxy, name) for name in PROXY_FLAGS})
        out.update({TRAINING_FLAG_PREFIX + k: self.train.get(k) for k in TRAIN_AFTER_SEARCH_FLAGS})
        return out

    @classmethod
    def from_flags(cls, values: dict) -> StudyConfig:
        rest, training = split_training_values(values)
        own = {f.name for f in flag_fields(cls)}
        return cls(**{k: v for k, v in rest.items() if k in own},
                   proxy=SearchConfig(**{k: v for k, v in rest.items() if k in PROXY_FLAGS}),
                   train={k: v for k, v in training.items() if k in TRAIN_AFTER_SEARCH_FLAGS})

    def result_dict(self) -> dict:
        return result_keys(self.flags())

    # ---- resolved settings ----
    def search_config(self) -> SearchConfig:
        """The search settings of the proxies (the kernel type is chosen per proxy, `eval_lib.study.proxies`)."""
        return dataclasses.replace(self.proxy, rand_seed=self.seed)

    def train_config(self, genotype: Genotype, save_dir) -> TrainConfig:
        p = self.proxy
        return training_config(self.train, genotype, space=p.space, data=p.data, data_path=p.data_path,
                                device=p.device, save_dir=save_dir, break_stale_lock=p.break_stale_lock)

    def training_seeds(self) -> list[int]:
        """The seeds of the ``--train_seeds`` trainings of every architecture (the same for all of them, so that
        training k of one architecture and training k of another form one "training" of the set): the first
        is ``--aug_seed`` (eval_searched_arch.py's default when not given), so ``--train_seeds 1`` trains as a
        study always did; the k-th after it is the first 32-bit word of the k-th child of numpy's
        ``SeedSequence(--aug_seed)`` (``SeedSequence(s, spawn_key=(k,))``). The test episodes (--aug_episode_seed)
        stay the same for every training: the spread is the training's."""
        base = self.train.get("seed")
        if base is None:
            base = field_default(next(f for f in flag_fields(TrainConfig, after_search=True) if f.name == "seed"))
        return [int(base)] + [int(np.random.SeedSequence(int(base), spawn_key=(k,)).generate_state(1)[0])
                              for k in range(1, self.train_seeds)]

    def search_items(self) -> list[SearchItem]:
        """The searches of ``--search_objectives`` in the order given (none without it); a UsageError names a bad
        item on one line and lists the valid objectives."""
        if self.search_objectives is None:
            return []
        flag_name = "--search_objectives"
        items: list[SearchItem] = []
        for text in str(self.search_objectives).split(SEARCH_ITEM_SEP):
            body = text.strip()
            combine = "log_rank" if body.startswith(LOG_RANK_PREFIX) else "rank"
            body = body.removeprefix(LOG_RANK_PREFIX).strip()
            names = parse_objectives(body, flag=flag_name, sep=SEARCH_OBJECTIVE_JOIN)
            if combine == "log_rank" and len(names) < 2:
                raise UsageError(f"{flag_name}: {text.strip()!r} combines one objective; log_rank: sums the log "
                                 f"ranks of several, e.g. log_rank:naswot+zico")
            item = SearchItem(len(items), names, combine)
            if any(i.slug == item.slug for i in items):
                raise UsageError(f"{flag_name} names the search {item.label} twice; name each once")
            items.append(item)
        return items

    def shard_index(self) -> tuple[int, int]:
        """(i, n) of ``--shard i/n``; (0, 1) without it."""
        if self.shard is None:
            return 0, 1
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(self.shard))
        if not match or not int(match[1]) < int(match[2]):
            raise UsageError(f"--shard {self.shard!r} is not valid; use i/n with 0 <= i < n, e.g. --shard 0/2 and "
                             f"--shard 1/2 in two processes")
        return int(match[1]), int(match[2])

    def check_log_rank_members(self) -> None:
        """The members of the log-rank combination: at least two known proxies that the study computes."""
        check_proxy_names(self.log_rank_members, MEASURED, "--log_rank_members")
        missing = [p for p in self.log_rank_members if p in ZERO_COST_PROXIES and p not in self.zero_cost_proxies]
        if missing:
            raise UsageError(f"--log_rank_members names {missing[0]}, which --zero_cost_proxies leaves out; add it "
                             f"there or drop it from the members")
        if len(self.log_rank_members) < 2:
            raise UsageError("--log_rank_members combines several proxies; name at least two")

    def validate(self) -> StudyConfig:
        """Refuse bad settings before any work or any write."""
        refuse_empty_paths(save_dir=self.save_dir)
        for name, least in (("n_archs", 0), ("train_seeds", 1), ("top_k", 1), ("bootstrap_resamples", 1)):
            if getattr(self, name) < least:
                raise UsageError(f"--{name} must be at least {least}, got {getattr(self, name)}")
        self.shard_index()
        self.search_items()
        check_proxy_names(self.zero_cost_proxies, ZERO_COST_PROXIES, "--zero_cost_proxies")
        self.check_log_rank_members()
        cfg = self.search_config().validate()
        tcfg = self.train_config(random_genotype(cfg.space, 0), "unused").validate()
        if "test" not in tcfg.eval_splits:
            raise UsageError("the study correlates the proxies with the test split; give --aug_eval_splits test "
                             "(or test,val)")
        return self


@dataclass(frozen=True)
class SearchItem:
    """One search of ``--search_objectives``: its objectives (in `OBJECTIVES`' order) and how they combine."""

    index: int  # its place in --search_objectives (its shard: (number of architectures + index) % n)
    objectives: tuple[str, ...]
    combine: str  # rank or log_rank (the search's --combine)

    @property
    def label(self) -> str:
        """The item as --search_objectives spells it (the objectives in their canonical order)."""
        joined = SEARCH_OBJECTIVE_JOIN.join(self.objectives)
        return LOG_RANK_PREFIX + joined if self.combine == "log_rank" else joined

    @property
    def slug(self) -> str:
        """The folder name: the label with the log-rank prefix as ``log_rank-``."""
        return self.label.replace(":", "-")

    @property
    def objective(self) -> str:
        """The search's --objective."""
        return ",".join(self.objectives)


def result_keys(flags: dict) -> dict:
    return {k: v for k, v in flags.items() if k not in NON_RESULT_KEYS}


# --------------------------------------------------------------------------------------------------
# The architectures


@dataclass(frozen=True)
class Arch:
    index: int
    id: str  # <index>-<label>, zero-padded: the folder archs/<id> and the order of study.jsonl
    source: str  # random, published or file
    genotype: Genotype
    name: str | None = None  # the preset's name or the file's path
    arch_seed: int | None = None  # random: eval_searched_arch.py --random_arch --arch_seed <arch_seed>


def arch_seed(seed: int, k: int) -> int:
    """The seed of the k-th random genotype, derived from the study's seed."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:40] or "genotype"


def architectures(cfg: StudyConfig) -> list[Arch]:
    """Random genotypes, then the published ones that fit, then the files, in that order (their indices)."""
    space = cfg.proxy.space
    found: list[tuple[str, str, Genotype, str | None, int | None]] = []
    for k in range(cfg.n_archs):
        s = arch_seed(cfg.seed, k)
        found.append(("random", f"random{k}", random_genotype(space, s), None, s))
    if cfg.published:
        fits = []
        for name, geno in PRESETS.items():
            try:
                fits.append(("published", name, geno.validate(space), name, None))
            except GenotypeError:
                continue
        if not fits:
            raise UsageError(f"--published: no published genotype fits --search_space_name {space.name} "
                             f"--max_nodes {space.max_nodes} (they are darts_fewshot genotypes with 3 nodes); "
                             f"drop --published")
        found += fits
    for path in cfg.genotype_files:
        file = Path(path)
        if not file.is_file():
            raise UsageError(f"--genotype_files: {path} is not a file; give genotype.json files written by a search")
        try:
            record = GenotypeRecord.from_json(file.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--genotype_files: cannot read {path} ({exc}); check the file") from None
        try:
            record.validated(space)
        except GenotypeError as exc:
            raise GenotypeError(f"--genotype_files {path}: {exc}") from None
        label = file.parent.name if file.stem == "genotype" and file.parent.name else file.stem
        found.append(("file", _slug(label), record.genotype, str(path), None))
    if not found:
        raise UsageError("no architectures to study; give --n_archs N (N >= 1), --published or --genotype_files F")
    width = max(3, len(str(len(found) - 1)))
    return [Arch(i, f"{i:0{width}d}-{label}", source, geno, name, s)
            for i, (source, label, geno, name, s) in enumerate(found)]
