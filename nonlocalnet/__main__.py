"""``python -m nonlocalnet COMMAND`` (also what torchrun runs: ``torchrun ... -m nonlocalnet train ...``)."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
