"""The paper's four runs (docs/method.md §5), in one place: the search settings of each (the dataset and number of
cells pick one), the training of its genotype after the search, and their names (``mini-5cell``, ...) as the
launcher and the sweep take them; and the search settings the original launcher used whatever its
``--ntk_layers`` (`original_launcher_preset`). The published genotypes are `search_lib.models.genotypes.PRESETS`."""

from __future__ import annotations

from typing import Any

from search_lib.core.errors import UsageError
from search_lib.data import DatasetSpec, resolve_dataset

# The search settings that differ between the paper's runs ...
PAPER_SEARCH: dict[tuple[str, int], dict] = {
    ("mini", 5): dict(algorithm="MAML", inner_lr_time=1000.0, reg_coef=1e-3),
    ("mini", 8): dict(algorithm="ANIL", inner_lr_time=1.0, reg_coef=1e-5),
    ("tiered", 5): dict(algorithm="MAML", inner_lr_time=1000.0, reg_coef=1e-3),
    ("tiered", 8): dict(algorithm="ANIL", inner_lr_time=1000.0, reg_coef=1e-3),
}
# ... and those they share.
PAPER_COMMON = dict(search_space_name="darts_fewshot", max_nodes=3, batch_size=3, ntk_channels=48,
                    ntk_type="MetaNTK_anl", n_ways=5, n_shots=1, n_queries=1, repeat=3, precision=3,
                    prune_number=1)
# The search settings the original launcher passed whatever its --ntk_layers (its own defaults: the 5-cell runs'
# MAML, τ 1000, λ 1e-3); its paper presets set only the training after the search.
ORIGINAL_LAUNCHER_SEARCH = dict(PAPER_COMMON, algorithm="MAML", inner_lr_time=1000.0, reg_coef=1e-3)
# Every search setting a preset fills in.
SEARCH_PRESET_KEYS = frozenset(PAPER_COMMON) | {k for p in PAPER_SEARCH.values() for k in p} | {"dataset",
                                                                                                 "ntk_layers"}
# The training settings that differ between the paper's runs.
TRAINING_PRESET_KEYS = ("epochs", "learning_rate", "lr_decay_epochs", "drop_path_prob", "batch_size",
                        "init_channels", "layers")

META_NAMES = {"mini": "MetaMiniImageNet", "tiered": "MetaTieredImageNet"}
PRESET_NAMES = {f"{d}-{c}cell": (d, c) for d, c in PAPER_SEARCH}  # mini-5cell, mini-8cell, tiered-5cell, ...


def paper_search_preset(dataset: str | DatasetSpec, cells: int) -> dict[str, Any]:
    """The search settings of a paper run (SearchConfig fields): dataset mini / tiered (any accepted name of
    them), cells 5 or 8."""
    key = resolve_dataset(dataset).key
    if (key, cells) not in PAPER_SEARCH:
        valid = ", ".join(PRESET_NAMES)
        raise UsageError(f"no paper preset for {dataset} with {cells} cells; valid: {valid}")
    return dict(PAPER_COMMON, **PAPER_SEARCH[(key, cells)], dataset=META_NAMES[key], ntk_layers=cells)


def original_launcher_preset(dataset: str | DatasetSpec, cells: int) -> dict[str, Any]:
    """The search settings of the original launcher given only a dataset and ``--ntk_layers`` (SearchConfig
    fields): its defaults, with that many cells."""
    paper_search_preset(dataset, cells)  # the same datasets and cell counts (UsageError otherwise)
    return dict(ORIGINAL_LAUNCHER_SEARCH, dataset=META_NAMES[resolve_dataset(dataset).key], ntk_layers=cells)


def paper_training_preset(dataset: str | DatasetSpec, layers: int) -> dict[str, Any]:
    """The paper's training and test settings (TrainConfig fields).

    miniImageNet: 100 epochs, lr 0.02 decayed x0.1 at 60 and 80, drop-path 0.2, batch 64 (<= 5 cells) / 40;
    tieredImageNet: 60 epochs, lr 0.01 decayed at 30, 40, 50, drop-path 0.1, batch 64 (<= 5 cells) / 56.
    """
    ds = resolve_dataset(dataset).key
    layers = int(layers)
    if ds == "mini":
        train = dict(epochs=100, learning_rate=0.02, lr_decay_epochs=[60, 80], drop_path_prob=0.2,
                     batch_size=64 if layers <= 5 else 40)
    elif ds == "tiered":
        train = dict(epochs=60, learning_rate=0.01, lr_decay_epochs=[30, 40, 50], drop_path_prob=0.1,
                     batch_size=64 if layers <= 5 else 56)
    else:
        raise UsageError(f"no paper training preset for {dataset!r}; the paper trained on MiniImageNet and "
                         f"TieredImageNet only, give the training flags explicitly")
    return dict(train, lr_decay_rate=0.1, scheduler="step", optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                init_channels=48, layers=layers, stem_multiplier=1, fsr=2, transform="A", n_ways=5,
                n_shots=[1, 5], n_queries=50, n_test_runs=1000, n_aug_support_samples=5, classifier="LR")
