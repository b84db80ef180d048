"""Train a searched architecture RFS-style on the base classes and test it on few-shot episodes.

Examples:
    python eval_searched_arch.py --genotype mini-5cell-1 --dataset MiniImageNet --data_path /data/mini
    python eval_searched_arch.py --genotype output/search/.../genotype.json --dataset TieredImageNet ...
    python eval_searched_arch.py --random_arch --arch_seed 3 --dataset Digits --epochs 5
    python eval_searched_arch.py --eval_only --checkpoint output/eval/.../checkpoint.pt

Re-running the same command in the same --save_dir resumes an interrupted run; a finished run is reported
without recomputation unless --overwrite. Exit codes: 0 ok, 2 usage/genotype error, 3 data error,
4 run failure. The command line lives in `eval_lib.commands.eval_command`; its flags come from
`eval_lib.train.train_config.TrainConfig`.
"""

import sys

from eval_lib.commands.eval_command import build_parser, config_from_args, main, run

__all__ = ["build_parser", "config_from_args", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
