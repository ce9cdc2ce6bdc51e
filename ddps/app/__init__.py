"""The segmentation application around the kernel library: run configs (``config``), datasets
(``data``), segmentors, heads built from a config (``heads``), the training recipe (``stages``,
``trainer``), evaluation, checkpoints, the original checkpoints' conversion (``mmseg``), ablations
and the ``ddps`` command line (``cli``). The library (``ddps.ops``, ``ddps.nn``, ...) never
imports it."""
