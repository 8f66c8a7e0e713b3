"""`python -m testbed.overlay ...`: the overlay daemon (see daemon.py)."""

import sys

from testbed.overlay.daemon import main

sys.exit(main())
