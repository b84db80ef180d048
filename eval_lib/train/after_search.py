"""The ``--aug_*`` flags: the training and test flags of eval_searched_arch.py as the commands that train
after something else take them (prune_metantknas.py / prune_launch.py with --train_after_search, and the
proxy study), and the `TrainConfig` they give for a genotype.

``--aug_<name>`` has the type, choices and help of eval_searched_arch.py's ``--<name>`` (both come from the
`TrainConfig` field) and defaults to None, meaning "eval_searched_arch.py's default", so that the launcher
can tell the values a user passed from the ones it fills in from the paper's training presets.
"""

from __future__ import annotations

import argparse

from eval_lib.train.train_config import TrainConfig
from search_lib.core.command_line import add_config_flags, field_default, flag_fields, format_value
from search_lib.models.genotypes import Genotype
from search_lib.models.space import SearchSpace

# The flags of the training after a search: --aug_<eval flag> (the original code's spelling; in the code "aug" means
# image augmentation only).
TRAINING_FLAG_PREFIX = "aug_"


def add_training_flags(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup | None = None,
                       help_suffix=None) -> None:
    """--aug_<flag> for each training / test flag the search forwards (same type, choices and help; the help
    ends with the eval flag's name and default, or with ``help_suffix(field)``)."""
    fields = flag_fields(TrainConfig, after_search=True)
    groups = {f.metadata["cli"]["group"]: group for f in fields} if group is not None else None
    add_config_flags(parser, fields, prefix=TRAINING_FLAG_PREFIX, groups=groups, unset_default=True,
                     help_suffix=help_suffix or eval_flag_default)


def eval_flag_default(f) -> str:
    """`` (eval_searched_arch.py --<name>; default <value>)``; a default of None is explained by the help itself."""
    default = field_default(f)
    return f" (eval_searched_arch.py --{f.name}{'' if default is None else f'; default {format_value(default)}'})"


def split_training_values(values: dict) -> tuple[dict, dict]:
    """Parsed flags split into (the other flags, the --aug_* values keyed by the training flag's name)."""
    training = {k[len(TRAINING_FLAG_PREFIX):]: v for k, v in values.items() if k.startswith(TRAINING_FLAG_PREFIX)}
    return {k: v for k, v in values.items() if not k.startswith(TRAINING_FLAG_PREFIX)}, training


def training_config(values: dict, genotype: Genotype, *, space: SearchSpace, data, data_path: str | None,
                     device: str, save_dir, break_stale_lock: bool = False) -> TrainConfig:
    """The `TrainConfig` of a genotype trained after a search or in a proxy study.

    ``values`` holds the --aug_* values (None: eval_searched_arch.py's default); the architecture, its search
    space, the dataset (the supervised name of ``data``, a `DatasetSpec`), the data folder, the
    device, the run folder and --break_stale_lock are the caller's.
    """
    overrides = {k: v for k, v in values.items() if v is not None}
    return TrainConfig(genotype=str(genotype), arch_space=space, dataset=data.plain_name,
                       data_path=data_path, device=device, save_dir=str(save_dir), break_stale_lock=break_stale_lock,
                       **overrides)
