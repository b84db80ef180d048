"""Train a searched architecture RFS-style on the base classes and test it on few-shot episodes.

Examples:
    python eval_searched_arch.py --genotype mini-5cell-1 --dataset MiniImageNet --data_path /data/mini
    python eval_searched_arch.py --genotype output/search/.../genotype.json --dataset TieredImageNet ...
    python eval_searched_arch.py --random_arch --arch_seed 3 --dataset Digits --epochs 5
    python eval_searched_arch.py --eval_only --checkpoint output/eval/.../checkpoint.pt

Re-running the same command in the same --save_dir resumes an interrupted run; a finished run is reported
without recomputation unless --overwrite. Exit codes: 0 ok, 2 usage/genotype error, 3 data error,
4 run failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from search_lib.cli import add_bool_flag, make_parser, run_cli


def _int_list(text: str) -> list[int]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,5, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,5, got {text!r}")
    return values


def _decay_list(text: str) -> list[int]:
    if str(text).strip() in ("", "none"):
        return []
    return _int_list(text)


def _split_list(text: str) -> list[str]:
    parts = [p.strip().lower() for p in str(text).split(",") if p.strip()]
    bad = [p for p in parts if p not in ("test", "val")]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"expected test and/or val (e.g. test,val), got {text!r}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(prog="eval_searched_arch.py",
                    description="Train a searched architecture on the base classes (RFS-style) and test it on "
                                "few-shot episodes of the novel classes; or test a checkpoint (--eval_only).")
    a = p.add_argument_group("architecture")
    a.add_argument("--genotype", default=None,
                   help="preset name (e.g. mini-5cell-1), a Genotype(...) string, or a search's genotype.json")
    add_bool_flag(a, "random_arch", False, "train a seeded random genotype of the same space (baseline)")
    a.add_argument("--arch_seed", type=int, default=0, help="seed of --random_arch")
    a.add_argument("--init_channels", type=int, default=48)
    a.add_argument("--layers", type=int, default=5, help="number of cells")
    a.add_argument("--stem_multiplier", type=int, default=1)
    a.add_argument("--fsr", type=int, default=2, help="channel factor at each reduction cell")

    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None,
                   help="MiniImageNet, TieredImageNet or Digits (Meta* names accepted); default MiniImageNet, "
                        "or the checkpoint's with --eval_only")
    d.add_argument("--data_path", default=None, help="folder of the RFS data files (not needed for Digits)")
    d.add_argument("--transform", default=None, help="A, B, C, D or TENAS (default A, or the checkpoint's)")
    d.add_argument("--image_size", type=int, default=None, help="image size (default: the dataset's)")
    d.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data-loading worker processes")

    t = p.add_argument_group("training (defaults: the paper's miniImageNet 5-cell settings)")
    t.add_argument("--drop_path_prob", type=float, default=0.2, help="maximum, reached linearly at the end")
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--batch_size", type=int, default=64)
    t.add_argument("--learning_rate", type=float, default=0.02)
    t.add_argument("--lr_decay_epochs", type=_decay_list, default=[60, 80], help="e.g. 60,80 (step scheduler)")
    t.add_argument("--lr_decay_rate", type=float, default=0.1)
    t.add_argument("--scheduler", choices=("step", "cosine", "exp"), default="step")
    t.add_argument("--exp_gamma", type=float, default=0.97, help="per-epoch factor of --scheduler exp")
    t.add_argument("--optimizer", default="sgd", help="sgd, adam or a torch_optimizer name (radam, lamb, ...)")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight_decay", type=float, default=5e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto, cpu or cuda")

    f = p.add_argument_group("few-shot test")
    f.add_argument("--n_ways", type=int, default=5)
    f.add_argument("--n_shots", type=_int_list, default=[1, 5], help="e.g. 1,5")
    f.add_argument("--n_queries", type=int, default=50, help="queries per class (RFS: 15)")
    f.add_argument("--n_test_runs", type=int, default=1000, help="episodes (RFS: 600)")
    f.add_argument("--n_aug_support_samples", type=int, default=5)
    f.add_argument("--classifier", default="LR", help="LR, SVM, NN, Cosine or Proto")
    add_bool_flag(f, "use_logits", False, "classify logits instead of the penultimate features")
    f.add_argument("--episode_seed", type=int, default=0, help="seed fixing the episodes")
    f.add_argument("--eval_splits", type=_split_list, default=["test", "val"],
                   help="test (novel classes) and/or val (meta-validation)")

    r = p.add_argument_group("run")
    r.add_argument("--save_dir", default=None,
                   help="run folder (default output/eval/<dataset>-<arch>-C<C>-L<layers>-seed<seed>; "
                        "with --eval_only: where eval_results.json goes, none if unset)")
    add_bool_flag(r, "eval_only", False, "only test --checkpoint (no training)")
    r.add_argument("--checkpoint", default=None, help="checkpoint to test with --eval_only")
    add_bool_flag(r, "trust_checkpoint", False,
                  "allow pickled Python objects in --checkpoint (e.g. the original code's); only for trusted files")
    add_bool_flag(r, "resume", True, "continue the run found in --save_dir")
    add_bool_flag(r, "overwrite", False, "delete the run found in --save_dir and start over")
    add_bool_flag(r, "progress", True, "show progress bars")
    r.add_argument("--stop_after_epoch", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace):
    from eval_lib.train import TrainConfig

    values = {k: v for k, v in vars(args).items()}
    return TrainConfig.from_dict(values)


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        return run(config_from_args(args))

    return run_cli(body)


def run(cfg) -> int:
    """Train and test (or only test) as `cfg` says; print the results table."""
    from eval_lib.train import format_results_table, train_and_evaluate

    if not logging.getLogger().handlers:  # console logging unless the caller set up its own
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    results = train_and_evaluate(cfg)
    if results.get("status") == "stopped":
        print(f"stopped after epoch {results['epoch']}; re-run the same command to resume "
              f"({results['save_dir']})")
        return 0
    if results.get("status") == "cached":
        print(f"run in {results.get('save_dir')} was already finished; showing its results "
              f"(--overwrite recomputes)")
    print(format_results_table(results))
    if results.get("save_dir") and results.get("mode") == "train":
        print(f"results: {results['save_dir']}/results.json")
    sys.stdout.flush()
    return 0


# Flags of this script that the search forwards as --aug_<name> with --train_after_search.
TRAIN_AFTER_SEARCH_FLAGS = (
    "init_channels", "layers", "stem_multiplier", "fsr", "transform", "image_size", "num_workers",
    "drop_path_prob", "epochs", "batch_size", "learning_rate", "lr_decay_epochs", "lr_decay_rate", "scheduler",
    "exp_gamma", "optimizer", "momentum", "weight_decay", "seed", "n_ways", "n_shots", "n_queries",
    "n_test_runs", "n_aug_support_samples", "classifier", "episode_seed", "eval_splits",
)


def train_flag_actions() -> list[argparse.Action]:
    """The argparse actions of the flags in TRAIN_AFTER_SEARCH_FLAGS (their types, choices and help)."""
    return [a for a in build_parser()._actions if a.dest in TRAIN_AFTER_SEARCH_FLAGS]


def train_after_search(result, search_cfg) -> int:
    """Train and few-shot test a search's genotype in-process (prune_metantknas.py --train_after_search).

    The run folder is <search save_dir>/train; unset aug_* values take this script's defaults.
    """
    from eval_lib.train import TrainConfig

    overrides = {k: v for k, v in search_cfg.train.items() if v is not None}
    dataset = search_cfg.dataset[4:] if search_cfg.dataset.lower().startswith("meta") else search_cfg.dataset
    cfg = TrainConfig(genotype=str(result.genotype), arch_space=search_cfg.search_space_name,
                      arch_max_nodes=search_cfg.max_nodes, dataset=dataset, data_path=search_cfg.data_path,
                      device=search_cfg.device, save_dir=str(result.save_dir / "train"), **overrides)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
