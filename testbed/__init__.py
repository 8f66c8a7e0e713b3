"""testbed: a network testbed emulator on Linux network namespaces."""

from testbed.errors import CommandError, SpecError, TestbedError
from testbed.topology import Topology

__all__ = ["Topology", "Network", "TestbedError", "SpecError", "CommandError"]


def __getattr__(name):  # lazy: importing specs must not import kernel code
    if name == "Network":
        from testbed.network import Network

        return Network
    raise AttributeError(name)
