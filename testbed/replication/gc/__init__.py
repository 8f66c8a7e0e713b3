"""Group communication with extended virtual synchrony (docs/replication.md, "Group
communication"): a sequencer with acknowledgement vectors for Agreed and Safe delivery,
Totem-like membership, the EVS delivery order at a configuration change.

In-process: `GroupNode` (node.py; ordering.py and membership.py are its two halves).
Standalone: `python -m testbed.replication.gc CONFIG.json` (daemon.py) serves one group to
local clients over a UNIX socket (client.py: GroupClient).
"""

from testbed.replication.gc.node import GroupNode, Timeouts, UdpTransport
from testbed.replication.gc.wire import (AGREED, MAX_PAYLOAD, SAFE, ConfId, Configuration,
                                         Delivery)

__all__ = ["GroupNode", "Timeouts", "UdpTransport", "AGREED", "SAFE", "MAX_PAYLOAD",
           "ConfId", "Configuration", "Delivery"]
