"""``python -m seglens`` (also what ``torchrun -m seglens`` runs)."""

import sys

from seglens.cli import main

sys.exit(main())
