"""``python -m search_lib.sweep``: several runs side by side, at the path the documentation shows (the command is
`eval_lib.commands.sweep`)."""

import sys

from eval_lib.commands.sweep import main

if __name__ == "__main__":
    sys.exit(main())
