"""`python -m kobold_desktop` is the same program as the `kobold-desktop` command."""

import sys

from kobold_desktop.cli import main

if __name__ == "__main__":
    sys.exit(main())
