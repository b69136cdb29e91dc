"""Train a flower classifier: `python train.py DATA_DIR [--save_dir DIR] ...` (see --help)."""

import sys

from helpers.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], prog="train.py"))
