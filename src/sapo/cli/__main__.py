"""``python -m sapo.cli``: what ``accelerate launch -m sapo.cli ...`` and ``torchrun -m sapo.cli`` run."""

import sys

from sapo.cli import main

sys.exit(main())
