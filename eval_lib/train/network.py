"""From a training config to the network: the architecture (a genotype, preset, genotype.json or seeded
random genotype), the run folder's default name, the AugmentCNN, its input shape and its size (parameters,
MACs)."""

from __future__ import annotations

import hashlib
import logging
import os

import torch
from torch import nn

from eval_lib.rfs_models.augment_cnn import AugmentCNN
from eval_lib.rfs_models.complexity import model_complexity
from eval_lib.train.train_config import TrainConfig
from search_lib.core.errors import UsageError
from search_lib.models.genotypes import PRESETS, Genotype, random_genotype, resolve_genotype_record

logger = logging.getLogger("metantknas.eval")


def resolve_architecture(cfg: TrainConfig, genotype: Genotype | None = None) -> Genotype:
    """The genotype a config asks for (a seeded random one with random_arch), or ``genotype`` checked against
    the config's space.

    A search's genotype.json must fit the space and node count it records; any genotype must use the ops
    of one search space.
    """
    if genotype is not None:
        return genotype.validate(cfg.arch_space)
    if cfg.random_arch:
        return random_genotype(cfg.arch_space, seed=cfg.arch_seed)
    if not cfg.genotype:
        raise UsageError("no architecture given; pass --genotype or --random_arch")
    genotype = resolve_genotype_record(cfg.genotype).genotype
    genotype.space()  # refuses a genotype that mixes the ops of two search spaces
    return genotype


def arch_label(cfg: TrainConfig, genotype) -> str:
    if cfg.random_arch:
        return f"random{cfg.arch_seed}"
    if cfg.genotype in PRESETS:
        return cfg.genotype
    return "geno-" + hashlib.sha1(str(genotype).encode()).hexdigest()[:8]


def default_save_dir(cfg: TrainConfig, genotype) -> str:
    ds = cfg.data.key
    return os.path.join("output", "eval",
                        f"{ds}-{arch_label(cfg, genotype)}-C{cfg.init_channels}-L{cfg.layers}-seed{cfg.seed}")


def network_kwargs(cfg: TrainConfig, num_classes: int, in_channels: int) -> dict:
    """The `AugmentCNN` arguments of the training's flags (channels, cells, stem, reduction factor) for a data set
    of ``num_classes`` classes and ``in_channels`` image channels: what a checkpoint records as ``net_kwargs``."""
    return dict(C=cfg.init_channels, layers=cfg.layers, num_classes=int(num_classes),
                stem_multiplier=cfg.stem_multiplier, fsr=cfg.fsr, in_channels=int(in_channels))


def build_network(genotype, net_kwargs: dict) -> nn.Module:
    return AugmentCNN(genotype, **net_kwargs)


def input_shape(dataset) -> tuple[int, ...]:
    with torch.random.fork_rng(devices=[]):
        return tuple(int(s) for s in dataset[0][0].shape)


def complexity(model: nn.Module, input_shape) -> dict:
    with torch.random.fork_rng(devices=[]):
        return model_complexity(model, tuple(input_shape))
