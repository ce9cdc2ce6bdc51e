"""`python -m ddps.ablate`: the same as `ddps ablate`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
