"""Run one of the paper's four searches from its preset, in-process.

    python prune_launch.py --dataset mini --cells 5 --data_path /data/miniImageNet
    python prune_launch.py --dataset tiered --cells 8 --train_after_search --device cuda

The data folder comes from --data_path or the environment (METANTKNAS_MINI_DATA /
METANTKNAS_TIERED_DATA, else METANTKNAS_DATA). Every other flag of prune_metantknas.py may follow
and wins over the preset (so do --aug_* training flags over the paper's training preset). Returns the
search's exit code. The command line lives in `eval_lib.launch`.
"""

import sys

from eval_lib.launch import build_parser, main, search_argv

__all__ = ["build_parser", "main", "search_argv"]

if __name__ == "__main__":
    sys.exit(main())
