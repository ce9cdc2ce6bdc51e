"""`python -m ddps CMD`: the ``ddps`` command (``ddps.app.cli``); under torchrun, `torchrun
--nproc_per_node N -m ddps train ...`."""
import sys

from .app.cli import main

sys.exit(main())
