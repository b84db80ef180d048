"""The proxies of a proxy study (`eval_lib.study.study_run`, docs/method.md §9).

* Training-free proxies of the search (docs/method.md §2–§3), on the search's supernet with only the
  genotype's ops alive: κ of the analytical MetaNTK of MAML and of ANIL, κ of the plain NTK, and the
  linear-region count. One `search_lib.search.scoring.CandidateScorer` per kernel type; repeat r of every
  architecture uses the seed ``repeat_seed(seed, 0, r)`` (weights, batch, head, crops), so all
  architectures are scored with the same random numbers, as the candidates of a search round are.
* Baselines on the network that is then trained (`eval_lib.train.network.build_network`, the training's
  channels and cells, initialised exactly as the training initialises it): parameter count, MACs as
  ptflops counts them and as TE-NAS counts them (Conv/Linear only), and the zero-cost proxies of the
  literature at initialisation, `ZERO_COST_PROXIES`.
* Two combined rankings, computed by the statistics from the others (`eval_lib.study.study_stats`): the search's
  own rule (rank sum of κ and linear regions) and AZ-NAS's log-rank sum over ``--log_rank_members``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from eval_lib.rfs_models.complexity import conv_linear_macs, count_parameters
from eval_lib.train.network import build_network, complexity, input_shape, network_kwargs
from eval_lib.train.train_config import TrainConfig
from search_lib.core.errors import DataError, UsageError
from search_lib.data import SupervisedDataset, build_transform, load_split, sample_batch
from search_lib.models.genotypes import PRUNED_ALPHA, Genotype, alphas_from_genotype
from search_lib.models.space import SearchSpace
from search_lib.search.kernels import KAPPA_SENTINEL
from search_lib.search.ranking import repeat_seed
from search_lib.search.scoring import CandidateScorer
from search_lib.search.search_config import SearchConfig
from search_lib.search.zero_cost import ZERO_COST_PROXIES

log = logging.getLogger("metantknas.study")

# name: (label, sign). The sign is how the method uses the proxy: +1 high is good, -1 low is good (κ).
PROXIES: dict[str, tuple[str, int]] = {
    "kappa_maml": ("κ MetaNTK-MAML", -1),
    "kappa_anil": ("κ MetaNTK-ANIL", -1),
    "kappa_ntk": ("κ NTK", -1),
    "regions": ("linear regions", 1),
    "params": ("#params", 1),
    "macs": ("MACs (ptflops)", 1),
    "macs_conv": ("MACs (Conv/Linear)", 1),
    "grad_norm": ("grad_norm", 1),
    "snip": ("snip", 1),
    "grasp": ("grasp", 1),
    "fisher": ("fisher", 1),
    "jacob_cov": ("jacob_cov", 1),
    "synflow": ("synflow", 1),
    "naswot": ("NASWOT", 1),
    "zico": ("ZiCo", 1),
    "swap": ("SWAP", 1),
    "meco": ("MeCo", 1),
    "search_rule": ("rank sum κ-MAML + regions", 1),
    "log_rank": ("log-rank combination", 1),
}
KERNELS = {"kappa_maml": ("MetaNTK_anl", "MAML"), "kappa_anil": ("MetaNTK_anl", "ANIL"), "kappa_ntk": ("NTK", "MAML")}
REPEATED = (*KERNELS, "regions")  # the proxies computed over the R repeats (mean and std)
SIZE = ("params", "macs", "macs_conv")
COMBINATIONS = ("search_rule", "log_rank")  # rows of their own, computed from the other proxies' ranks
SEARCH_RULE = ("kappa_maml", "regions")  # the search's rule: κ and linear regions, ranks summed
DEFAULT_LOG_RANK_MEMBERS = ("naswot", "synflow", "zico", "swap", "meco")
MEASURED = tuple(p for p in PROXIES if p not in COMBINATIONS)  # the proxies an architecture's record holds


BASELINES = (*SIZE, *ZERO_COST_PROXIES)  # one value each, on the trained network at initialisation


def check_proxy_names(names: Iterable[str], valid: Iterable[str], flag: str) -> list[str]:
    """``names`` as a list; UsageError naming ``flag`` and the valid names when one is unknown or repeated."""
    names, valid = list(names), list(valid)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise UsageError(f"{flag}: unknown proxy {unknown[0]!r}; valid: {', '.join(valid)}")
    if len(set(names)) != len(names):
        raise UsageError(f"{flag}: a proxy is named twice ({' '.join(names)}); name each once")
    return names


# --------------------------------------------------------------------------------------------------
# κ and linear regions on the search's supernet


def alive_mask(genotype: Genotype, space: SearchSpace) -> np.ndarray:
    """The genotype as the search's alive array, bool (2 cell types, edges, ops)."""
    normal, reduce = alphas_from_genotype(genotype, space)
    return torch.stack([normal, reduce]).numpy() > PRUNED_ALPHA / 2


def kernel_config(cfg: SearchConfig, name: str) -> SearchConfig:
    """The search settings of one kernel type. The plain NTK gets as many images as a MetaNTK meta-batch
    holds (tasks × ways × (shots + queries): 30 with the defaults, the NTK search's own default)."""
    ntk_type, algorithm = KERNELS[name]
    changes = dict(ntk_type=ntk_type, algorithm=algorithm, candidates_per_pass=1, only_lrs=False)
    if ntk_type == "NTK":
        meta = dataclasses.replace(cfg, ntk_type="MetaNTK_anl")
        changes["batch_size"] = meta.effective_batch_size * cfg.n_ways * (cfg.n_shots + cfg.n_queries)
    return dataclasses.replace(cfg, **changes)


def mean_std(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "values": [float(v) for v in values]}


class KernelProxies:
    """The search's scorers, one per kernel type, built once; `score` gives an architecture's κs and regions."""

    def __init__(self, cfg: SearchConfig, device: torch.device):
        self.cfg = cfg
        split = load_split(cfg.data, cfg.data_path, "train")
        self.scorers: dict[str, CandidateScorer] = {}
        for name in KERNELS:
            kcfg = kernel_config(cfg, name).validate()
            if not kcfg.meta and kcfg.effective_batch_size > len(split):
                raise DataError(f"the NTK batch of {kcfg.effective_batch_size} images exceeds the {len(split)} "
                                f"training images of {cfg.dataset}; lower --batch_size or --n_ways")
            self.scorers[name] = CandidateScorer(kcfg, split, device, len(split.class_ids))
        self.last_cost_s: dict[str, float] = {}

    def score(self, alive: np.ndarray, label: str) -> tuple[dict, dict]:
        """({proxy: {"mean", "std", "values"}} over the repeats, {kernel: repeats that hit the κ sentinel}).

        ``last_cost_s`` then holds the seconds each proxy took over all repeats (a kernel's includes its repeats'
        set-up: weights, batch, head)."""
        values: dict[str, list[float]] = {name: [] for name in REPEATED}
        self.last_cost_s = dict.fromkeys(REPEATED, 0.0)
        for rep in range(self.cfg.repeat):
            seed = repeat_seed(self.cfg.rand_seed, 0, rep)
            for name, scorer in self.scorers.items():
                t0, regions_s = time.perf_counter(), 0.0
                scorer.begin_repeat(seed)
                try:
                    values[name].append(scorer.kappa(alive, f"{label} repeat {rep} ({name})"))
                    if name == "kappa_maml":  # the thin network and crops are the same in every scorer
                        t1 = time.perf_counter()
                        values["regions"].append(float(scorer.regions(alive)))
                        regions_s = time.perf_counter() - t1
                finally:
                    scorer.end_repeat()
                self.last_cost_s[name] += time.perf_counter() - t0 - regions_s
                self.last_cost_s["regions"] += regions_s
        sentinels = {name: sum(v == KAPPA_SENTINEL for v in values[name]) for name in KERNELS}
        return {name: mean_std(v) for name, v in values.items()}, sentinels


# --------------------------------------------------------------------------------------------------
# Baselines on the trained network


@dataclass
class BaselineData:
    """What the baselines need of the training data: the class count, the image shape and one seeded batch."""

    num_classes: int
    input_shape: tuple[int, ...]
    images: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def load(cls, tcfg: TrainConfig, seed: int) -> BaselineData:
        """``min(batch_size, images)`` training images, drawn with ``seed`` and the training's transform."""
        conf = tcfg.normalised()
        train_set = SupervisedDataset(tcfg.data, tcfg.data_path, partition="train", transform=conf["transform"],
                                      train=True, image_size=tcfg.image_size)
        if len(train_set) == 0:
            raise DataError(f"the training partition of {tcfg.dataset} is empty; check --data_path")
        tf = build_transform(conf["transform"], train=True, image_size=tcfg.image_size, dataset=tcfg.data)
        x, y = sample_batch(train_set.split, min(tcfg.batch_size, len(train_set)), tf, np.random.default_rng(seed))
        return cls(int(train_set.num_classes), input_shape(train_set), x, y)


def initial_network(genotype: Genotype, tcfg: TrainConfig, data: BaselineData) -> nn.Module:
    """The network the training builds, with the weights it starts from (it seeds torch with its seed first);
    the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tcfg.seed)
        return build_network(genotype, network_kwargs(tcfg, data.num_classes, data.input_shape[0]))


def _finite_or_none(name: str, value: float, context: str) -> float | None:
    if math.isfinite(value):
        return value
    log.warning("%s: %s is %s; recorded as null (left out of the statistics)", context, name, value)
    return None


def baselines(genotype: Genotype, tcfg: TrainConfig, data: BaselineData, device: torch.device,
              zero_cost: Iterable[str] = tuple(ZERO_COST_PROXIES), costs: dict | None = None,
              context: str = "") -> dict:
    """#params, MACs (ptflops, and Conv/Linear only) and the ``zero_cost`` proxies of the network the training
    starts from, in train mode as built, on the baselines' batch. Seconds per proxy go into ``costs``;
    a non-finite value (e.g. NASWOT of a singular kernel) is recorded as None."""
    costs = {} if costs is None else costs
    model = initial_network(genotype, tcfg, data)
    out: dict = {}
    for name, count in (("params", lambda: count_parameters(model)),
                        ("macs", lambda: complexity(model, data.input_shape)["macs"]),
                        ("macs_conv", lambda: conv_linear_macs(model, data.input_shape))):
        t0 = time.perf_counter()
        value = count()
        costs[name] = time.perf_counter() - t0
        out[name] = None if value is None else int(value)
    model.to(device)
    images, targets = data.images.to(device), data.targets.to(device)
    for name in zero_cost:
        t0 = time.perf_counter()
        value = ZERO_COST_PROXIES[name](model, images, targets)
        costs[name] = time.perf_counter() - t0
        out[name] = _finite_or_none(name, value, context or str(genotype))
    return out
