"""``python -m vitrim`` (also what ``torchrun -m vitrim`` runs): the ``vitrim`` command line."""

import sys

from vitrim.cli import main

if __name__ == "__main__":
    sys.exit(main())
