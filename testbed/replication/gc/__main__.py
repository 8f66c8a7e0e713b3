"""`python -m testbed.replication.gc CONFIG.json`: the group communication daemon (see
testbed.replication.gc.daemon)."""

import sys

from testbed.replication.gc.daemon import main

sys.exit(main())
