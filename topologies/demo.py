"""Demo: `hosts` hosts on one switch, every host link shaped the same way.

    testbed cli topologies/demo.py [--set hosts=4 --set rate_mbit=20 --set delay_ms=0]

rate_mbit=0 leaves the links unshaped in rate; delay_ms is one way on each host link, so a
host-to-host RTT is 4 * delay_ms. emulate=1 builds delay lines even when delay_ms=0, so
delay and loss can still be changed at runtime (`link h1 s1 delay 20ms`).
"""

from testbed import SpecError, Topology


def build(hosts=3, rate_mbit=10, delay_ms=5, emulate=0) -> Topology:
    if isinstance(hosts, bool) or not isinstance(hosts, int) or not 1 <= hosts <= 200:
        raise SpecError(f"demo: hosts must be a whole number from 1 to 200, got {hosts!r}")
    t = Topology("demo")
    names = [t.add_host(f"h{i}") for i in range(1, hosts + 1)]
    t.add_switch("s1")
    for h in names:
        t.add_link(h, "s1", rate=rate_mbit or None, delay=delay_ms, emulate=bool(emulate))
    return t
