"""`python -m ddps.segment`: the same as `ddps segment`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]]))
