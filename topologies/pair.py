"""Two hosts on one emulated link: the unit of the emulator's fidelity measurements."""

from testbed import Topology

# TCP autotuning must be allowed windows above one bandwidth-delay product (1 Gbit/s x
# 400 ms RTT = 50 MB); these are per-namespace sysctls, the root namespace is untouched.
BIG_TCP = {"net.ipv4.tcp_rmem": "4096 131072 134217728",
           "net.ipv4.tcp_wmem": "4096 65536 134217728"}


def build(rate_mbit=None, delay_ms=0, jitter_ms=0, loss_pct=0, queue_pkts=None,
          emulate=False, lossy_direction="both") -> Topology:
    """h1 <-> h2. delay_ms is one way (RTT = 2 x delay_ms); loss on lossy_direction only
    ('both', 'a_to_b' for h1->h2, 'b_to_a')."""
    t = Topology("pair")
    t.add_host("h1", sysctls=BIG_TCP)
    t.add_host("h2", sysctls=BIG_TCP)
    loss = {"loss": loss_pct}
    if lossy_direction == "both":
        t.add_link("h1", "h2", rate=rate_mbit, delay=delay_ms, jitter=jitter_ms,
                   queue_pkts=queue_pkts, emulate=emulate, **loss)
    else:
        other = "b_to_a" if lossy_direction == "a_to_b" else "a_to_b"
        t.add_link("h1", "h2", rate=rate_mbit, delay=delay_ms, jitter=jitter_ms,
                   queue_pkts=queue_pkts, emulate=emulate,
                   **{lossy_direction: loss, other: {"loss": 0}})
    return t
