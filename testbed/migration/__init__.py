"""Live TCP session migration (paper 001) with TCP_REPAIR.

- repair: dump a connection's state in one namespace, rebuild it in another
- state: the checksummed migration image (TCP state, queues, app state, memory image)
- streamer / player: a migratable 2 Mbit/s video-like server and a buffering player
- agent: a site's address changes; controller: paper 001's 11-step sequence on the
  network of topologies.gmpls_dr (the caller passes the topology module in)
- replication, wan: paper 003's storage replication and live migration across a WAN
"""

from testbed.migration.repair import RepairError, TcpState, dump, restore
from testbed.migration.state import Image, StateError, decode

__all__ = ["RepairError", "TcpState", "dump", "restore", "Image", "StateError", "decode"]
