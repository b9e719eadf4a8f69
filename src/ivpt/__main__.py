"""``python -m ivpt ...`` runs the ``ivpt`` command line."""

import sys

from ivpt.cli import main

sys.exit(main())
