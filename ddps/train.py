"""`python -m ddps.train`: the same as `ddps train`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
