"""`python -m testbed.failover CONFIG.json`: the Wackamole daemon (see testbed.failover.daemon)."""

import sys

from testbed.failover.daemon import main

sys.exit(main())
