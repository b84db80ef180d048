"""``python -m eval_lib.report``: the pictures of run folders, at the path the documentation shows (the command is
`eval_lib.commands.draw_pictures`)."""

import sys

from eval_lib.commands.draw_pictures import main

if __name__ == "__main__":
    sys.exit(main())
