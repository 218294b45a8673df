"""The ``tdqrt`` command line and the tools built on every other layer: sampling to files, demo, evaluation."""
