"""Paper 000's QoS setup: a source host behind a router whose WAN interface is the bottleneck.

    src --(LAN, unshaped)-- r1 ==(wan: rate_mbit, r1 -> dst)== dst

The queue sits on r1's egress toward dst, as IOS's `custom-queue-list` sits on the router's
interface: packets are forwarded into it, so the senders' TCP Small Queues do not limit its
backlog and it fills until it drops, as a router's does. Put a queueing discipline on it with
`net.link("r1", "dst").set_queue("a_to_b", queue)`. delay_ms (one way, on the WAN link)
needs netem or the delay line.
"""

from testbed import Topology


def build(rate_mbit=100, delay_ms=0, queue_pkts=None) -> Topology:
    t = Topology("qos_router")
    t.add_host("src")
    t.add_router("r1")
    t.add_host("dst")
    t.add_link("src", "r1")
    t.add_link("r1", "dst", rate=rate_mbit, delay=delay_ms, queue_pkts=queue_pkts)
    return t
