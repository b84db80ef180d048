"""Run one of the paper's four searches from its preset, in-process.

    python prune_launch.py --dataset mini --cells 5 --data_path /data/miniImageNet
    python prune_launch.py --dataset tiered --cells 8 --train_after_search --device cuda
    bash scripts/script_mini_5cell.sh --device cpu     # the original repository's argument list

The data folder comes from --data_path or the environment (METANTKNAS_MINI_DATA /
METANTKNAS_TIERED_DATA, else METANTKNAS_DATA). Every flag of prune_metantknas.py is taken and wins over
the preset (so do --aug_* training flags over the paper's training preset), and so are the original
launcher's flags (--gpu, --space, --seed, --dartsbs, --ntk_layers 5|8 for --cells, ...). Returns the
search's exit code. The command line lives in `eval_lib.commands.launch_command`.
"""

import sys

from eval_lib.commands.launch_command import build_parser, launch_config, main

__all__ = ["build_parser", "launch_config", "main"]

if __name__ == "__main__":
    sys.exit(main())
