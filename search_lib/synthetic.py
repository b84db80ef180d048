"""``python -m search_lib.synthetic``: synthetic data in the RFS formats, at the path the documentation shows (the
command is `search_lib.data.synthetic`)."""

import sys

from search_lib.data.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
