"""Asynchronous block mirroring to a disaster-recovery site (paper 000): `serve` on the DR
site, `sync` from the primary, heartbeat before each sync, promotion at failover.
See daemon.py for the protocol and the atomic commit, wire.py for the frames."""

from testbed.mirror.bucket import TokenBucket
from testbed.mirror.daemon import (MirrorError, Receiver, heartbeat, promote, status, sync)
from testbed.mirror.volume import DEFAULT_BLOCK, VolumeError, volume_manifest
from testbed.mirror.wire import DEFAULT_PORT, WireError

__all__ = ["TokenBucket", "MirrorError", "Receiver", "heartbeat", "promote", "status", "sync",
           "DEFAULT_BLOCK", "VolumeError", "volume_manifest", "DEFAULT_PORT", "WireError"]
