"""``python -m poisonreach``: the command line, e.g. under ``torchrun --nproc-per-node N -m poisonreach run ...``."""

import sys

from .cli import main

sys.exit(main())
