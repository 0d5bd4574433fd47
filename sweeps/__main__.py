"""python -m sweeps SPEC [--name NAME]: the same as `clockdistill sweep`."""

import sys

from clockdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
