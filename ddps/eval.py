"""`python -m ddps.eval`: the same as `ddps eval`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
