"""`python -m testbed.tunnel ...`: the user-space IP-in-UDP tunnel daemon (see daemon.py)."""

import sys

from testbed.tunnel.daemon import main

sys.exit(main())
