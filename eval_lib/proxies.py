"""The proxies of a proxy study (`eval_lib.proxy_study`, docs/method.md §9), each computed by the toolkit's own code.

* Training-free proxies of the search (docs/method.md §2–§3), on the search's supernet with only the
  genotype's ops alive: κ of the analytical MetaNTK of MAML and of ANIL, κ of the plain NTK, and the
  linear-region count. One `search_lib.scoring.CandidateScorer` per kernel type; repeat r of every
  architecture uses the seed ``repeat_seed(seed, 0, r)`` (weights, batch, head, crops), so all
  architectures are scored with the same random numbers, as the candidates of a search round are.
* Baselines on the network that is then trained (`eval_lib.network.build_network`, the training's
  channels and cells, initialised exactly as the training initialises it): parameter count and MACs
  (`eval_lib.network.complexity`), and two zero-cost proxies at initialisation, grad_norm and synflow.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from search_lib.config import SearchConfig
from search_lib.data import SupervisedDataset, build_transform, load_split, sample_batch
from search_lib.errors import DataError
from search_lib.genotypes import PRUNED_ALPHA, Genotype, alphas_from_genotype
from search_lib.kernels import KAPPA_SENTINEL
from search_lib.scoring import CandidateScorer
from search_lib.ranking import repeat_seed

from .config import TrainConfig
from .network import build_network, complexity, input_shape

# name: (label, sign). The sign is how the method uses the proxy: +1 high is good, -1 low is good (κ).
PROXIES: dict[str, tuple[str, int]] = {
    "kappa_maml": ("κ MetaNTK-MAML", -1),
    "kappa_anil": ("κ MetaNTK-ANIL", -1),
    "kappa_ntk": ("κ NTK", -1),
    "regions": ("linear regions", 1),
    "params": ("#params", 1),
    "macs": ("MACs", 1),
    "grad_norm": ("grad_norm", 1),
    "synflow": ("synflow", 1),
}
KERNELS = {"kappa_maml": ("MetaNTK_anl", "MAML"), "kappa_anil": ("MetaNTK_anl", "ANIL"), "kappa_ntk": ("NTK", "MAML")}
REPEATED = (*KERNELS, "regions")  # the proxies computed over the R repeats (mean and std)
BASELINES = ("params", "macs", "grad_norm", "synflow")  # one value each, on the trained network at init


def alive_mask(genotype: Genotype, space: str) -> np.ndarray:
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

    def score(self, alive: np.ndarray, label: str) -> tuple[dict, dict]:
        """({proxy: {"mean", "std", "values"}} over the repeats, {kernel: repeats that hit the κ sentinel})."""
        values: dict[str, list[float]] = {name: [] for name in REPEATED}
        for rep in range(self.cfg.repeat):
            seed = repeat_seed(self.cfg.rand_seed, 0, rep)
            for name, scorer in self.scorers.items():
                scorer.begin_repeat(seed)
                try:
                    values[name].append(scorer.kappa(alive, f"{label} repeat {rep} ({name})"))
                    if name == "kappa_maml":  # the thin network and crops are the same in every scorer
                        values["regions"].append(float(scorer.regions(alive)))
                finally:
                    scorer.end_repeat()
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
    def load(cls, tcfg: TrainConfig, seed: int) -> "BaselineData":
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
    net_kwargs = dict(C=tcfg.init_channels, layers=tcfg.layers, num_classes=data.num_classes,
                      stem_multiplier=tcfg.stem_multiplier, fsr=tcfg.fsr, in_channels=int(data.input_shape[0]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tcfg.seed)
        return build_network(genotype, net_kwargs)


def grad_norm(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Σ over parameters of ‖∂L/∂θ‖₂, L the mean cross-entropy of one batch (train mode, as at the first
    training step)."""
    model.train()
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(images), targets).backward()
    total = sum(float(p.grad.norm()) for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return total


def synflow(model: nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    """SynFlow (Tanaka et al. 2020): on a float64 copy with every parameter replaced by its absolute value and
    BatchNorm in eval mode, R = Σ of the output for an all-ones input; the score is Σ |θ ⊙ ∂R/∂θ|."""
    net = copy.deepcopy(model).to(device=device, dtype=torch.float64).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    net.zero_grad(set_to_none=True)
    net(torch.ones(1, *shape, dtype=torch.float64, device=device)).sum().backward()
    score = sum(float((p.detach() * p.grad).abs().sum()) for p in net.parameters() if p.grad is not None)
    return score if math.isfinite(score) else float("inf")


def baselines(genotype: Genotype, tcfg: TrainConfig, data: BaselineData, device: torch.device) -> dict:
    """{"params", "macs", "grad_norm", "synflow"} of the network the training starts from."""
    model = initial_network(genotype, tcfg, data)
    cost = complexity(model, data.input_shape)
    model.to(device)
    gn = grad_norm(model, data.images.to(device), data.targets.to(device))
    return {"params": int(cost["params"]), "macs": None if cost["macs"] is None else int(cost["macs"]),
            "grad_norm": gn, "synflow": synflow(model, data.input_shape, device)}
