"""``python -m nonlocalnet COMMAND`` (also what torchrun runs: ``torchrun ... -m nonlocalnet train ...``)."""
import sys

from .cli import main

sys.exit(main())
