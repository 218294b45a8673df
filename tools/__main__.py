"""``python -m tdqrt.tools`` runs the ``tdqrt`` command line."""
import sys

from tdqrt.tools.cli import main

sys.exit(main())
