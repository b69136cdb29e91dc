"""Name the flower in a photo: `python predict.py IMAGE CHECKPOINT [--top_k K] ...` (see --help)."""

import sys

from helpers.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]], prog="predict.py"))
