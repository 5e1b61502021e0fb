"""``python -m pinpoint`` (and ``torchrun --nproc_per_node N -m pinpoint tune ...``): the command line."""
import sys

from .cli import main

sys.exit(main())
