"""The shipped run configs (``ddps train --config <name>``), installed as ``ddps.configs``."""
