"""Training-free pruning search for few-shot learning with the (Meta)NTK condition number and linear regions.

    python prune_metantknas.py --dataset MetaDigits --ntk_channels 8 --repeat 1 --save_dir runs/demo

See README.md ("Search") for every flag and the outputs in --save_dir.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from search_lib.cli import add_bool_flag, make_parser, run_cli
from search_lib.config import ALGORITHMS, BN_MODES, INIT_MODES, NTK_TYPES, SearchConfig
from search_lib.data import DATASET_NAMES, TRANSFORM_NAMES
from search_lib.ops import SEARCH_SPACES
from search_lib.supernet import NORM_TYPES
from search_lib.utils import DEVICE_CHOICES

TRAIN_PREFIX = "aug_"


def build_parser() -> argparse.ArgumentParser:
    d = SearchConfig()
    p = make_parser("prune_metantknas.py", "Pruning-based training-free NAS with NTK / MetaNTK and linear regions.")
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=d.data_path, help="folder of the RFS data files (not needed for *Digits)")
    g.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(DATASET_NAMES)}")
    g.add_argument("--transform", default=d.transform, choices=TRANSFORM_NAMES, help="search-time transform")
    g.add_argument("--image_size", type=int, default=d.image_size, help="search input size (paper: 32)")
    g.add_argument("--n_ways", type=int, default=d.n_ways)
    g.add_argument("--n_shots", type=int, default=d.n_shots, help="support images per class of a search task")
    g.add_argument("--n_queries", type=int, default=d.n_queries, help="query images per class of a search task")
    g.add_argument("--batch_size", type=int, default=d.batch_size,
                   help="tasks per meta-batch (MetaNTK, default 3) or images (NTK, default 30)")
    g = p.add_argument_group("search space")
    g.add_argument("--search_space_name", default=d.search_space_name, choices=list(SEARCH_SPACES))
    g.add_argument("--max_nodes", type=int, default=d.max_nodes, help="intermediate nodes per cell")
    g = p.add_argument_group("search")
    g.add_argument("--save_dir", default=d.save_dir, help="run folder (used as given); re-running resumes it")
    g.add_argument("--rand_seed", type=int, default=d.rand_seed, help="-1 draws a seed (recorded in config.json)")
    g.add_argument("--precision", type=int, default=d.precision, help="digits the scores are rounded to")
    g.add_argument("--prune_number", type=int, default=d.prune_number, help="ops pruned per edge and round")
    g.add_argument("--repeat", type=int, default=d.repeat, help="random initialisations per round")
    g.add_argument("--init", default=d.init, choices=list(INIT_MODES), help="weight initialisation")
    add_bool_flag(g, "only_lrs", d.only_lrs, "rank by linear regions only")
    g.add_argument("--device", default=d.device, help=f"one of {', '.join(DEVICE_CHOICES)}")
    add_bool_flag(g, "overwrite", d.overwrite, "discard a finished or different run in --save_dir")
    g = p.add_argument_group("kernel")
    g.add_argument("--ntk_type", default=d.ntk_type, choices=NTK_TYPES)
    g.add_argument("--ntk_channels", type=int, default=d.ntk_channels, help="supernet channels C")
    g.add_argument("--ntk_layers", type=int, default=d.ntk_layers, help="supernet cells (3N+2)")
    g.add_argument("--ntk_N", type=int, default=d.ntk_N, help="cells per stage; must match --ntk_layers")
    g.add_argument("--ntk_stemm", type=int, default=d.ntk_stemm, help="stem multiplier")
    g.add_argument("--ntk_fsr", type=int, default=d.ntk_fsr, help="channel factor at each reduction")
    g.add_argument("--algorithm", default=d.algorithm, choices=ALGORITHMS, help="MetaNTK of MAML or ANIL")
    g.add_argument("--inner_lr_time", type=float, default=d.inner_lr_time, help="τ; >= 1000 means infinity")
    g.add_argument("--reg_coef", type=float, default=d.reg_coef, help="λ")
    g.add_argument("--bn_mode", default=d.bn_mode, choices=BN_MODES, help="networks in train or eval mode")
    g.add_argument("--params_types", default=d.params_types, choices=("w", "wb"), help="weights, or weights+biases")
    g.add_argument("--norm_type", default=d.norm_type, choices=NORM_TYPES, help="BatchNorm replacement")
    g.add_argument("--lr_batches", type=int, default=d.lr_batches, help="linear regions: batches of crops")
    g.add_argument("--lr_batch_size", type=int, default=d.lr_batch_size, help="linear regions: crops per batch")
    g = p.add_argument_group("training after search")
    add_bool_flag(g, "train_after_search", d.train_after_search, "train and few-shot test the found genotype")
    add_train_flags(g)
    return p


def add_train_flags(g) -> None:
    """--aug_<flag> for each training / test flag of eval_searched_arch.py (same type, choices and help).

    They default to None, meaning "eval_searched_arch.py's default", so that prune_launch.py can tell
    the values a user passed from the ones it may fill in from the paper's presets.
    """
    from eval_searched_arch import train_flag_actions

    for a in train_flag_actions():
        g.add_argument(f"--{TRAIN_PREFIX}{a.dest}", type=a.type, choices=a.choices, default=None,
                       help=f"{a.help or ''} (eval_searched_arch.py --{a.dest}; default {a.default})".strip())


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    values = vars(args)
    train = {k[len(TRAIN_PREFIX):]: v for k, v in values.items() if k.startswith(TRAIN_PREFIX)}
    fields = {k: v for k, v in values.items() if not k.startswith(TRAIN_PREFIX)}
    return SearchConfig(**fields, train=train)


def run(cfg: SearchConfig) -> int:
    from search_lib.pruning import run_search

    result = run_search(cfg)  # logs the genotype and where the outputs are
    if cfg.train_after_search:
        from eval_searched_arch import train_after_search

        return train_after_search(result, cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        return run(config_from_args(args))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
