"""`python -m ddps.convert`: the same as `ddps convert`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
