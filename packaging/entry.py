"""The bundled program's entry point: the same command line as `kobold-desktop`."""

import multiprocessing
import sys

from kobold_desktop.cli import main

if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())
