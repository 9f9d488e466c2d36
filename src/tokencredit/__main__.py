"""``python -m tokencredit`` runs the command line, so ``accelerate launch -m tokencredit ...`` works."""

import sys

from tokencredit.cli import main

sys.exit(main())
