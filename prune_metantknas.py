"""Training-free pruning search for few-shot learning with the (Meta)NTK condition number and linear regions.

    python prune_metantknas.py --dataset MetaDigits --ntk_channels 8 --repeat 1 --save_dir runs/demo

See docs/usage.md ("Search") for every flag and the outputs in --save_dir, and docs/method.md for the method.
The command line lives in `eval_lib.commands.search_command`; its flags come from
`search_lib.search.search_config.SearchConfig`.
"""

import sys

from eval_lib.commands.search_command import build_parser, config_from_args, main, run

__all__ = ["build_parser", "config_from_args", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
