"""``python -m eval_lib.proxy_study``: the proxy study, at the path the documentation shows (the command is
`eval_lib.commands.study_command`)."""

import sys

from eval_lib.commands.study_command import main

if __name__ == "__main__":
    sys.exit(main())
