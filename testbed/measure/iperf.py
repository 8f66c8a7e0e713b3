"""iperf3 between two nodes (JSON output), as a DataFrame of intervals."""

from __future__ import annotations

import json
from typing import Optional

import pandas as pd

from testbed.errors import TestbedError
from testbed.process import listening


def iperf3(client, server, seconds: float = 5, udp: bool = False,
           rate_mbit: Optional[float] = None, reverse: bool = False, port: int = 5201,
           interval: float = 1.0, omit: float = 0, window: Optional[str] = None,
           congestion: Optional[str] = None, extra: tuple = (),
           dst: Optional[str] = None) -> pd.DataFrame:
    """Run iperf3 from client to server (Node objects). One row per reporting interval:
    t_start, t_end, bits_per_second, bytes, retransmits (TCP). df.attrs holds the totals:
    sender_bps, receiver_bps (the goodput), retransmits; for UDP lost_percent, packets and
    lost_packets as the server counted them. dst: the address to connect to (default
    server.ip_toward(client)), e.g. the server's end of a tunnel."""
    srv = server.start(["iperf3", "-s", "-1", "-p", str(port)], name=f"iperf3-s{port}",
                       ready=listening(server.ns, port))
    argv = ["iperf3", "-c", dst or server.ip_toward(client), "-p", str(port), "-J",
            "-t", f"{seconds:g}", "-i", f"{interval:g}"]
    if omit:
        argv += ["-O", f"{omit:g}"]
    if udp:
        argv += ["-u", "-b", f"{(rate_mbit or 1):g}M"]
    elif rate_mbit:
        argv += ["-b", f"{rate_mbit:g}M"]
    if reverse:
        argv.append("-R")
    if window:
        argv += ["-w", window]
    if congestion:
        argv += ["-C", congestion]
    argv += list(extra)
    try:
        res = client.run(argv, timeout=seconds + omit + 30, check=False)
    finally:
        srv.stop()
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise TestbedError(f"iperf3 {client.name}->{server.name}: no JSON output "
                           f"({res.stderr.strip()[-200:]})") from None
    if "error" in data:
        raise TestbedError(f"iperf3 {client.name}->{server.name}: {data['error']}")
    rows = []
    for iv in data.get("intervals", []):
        s = iv["sum"]
        if s.get("omitted"):
            continue
        rows.append({"t_start": s["start"], "t_end": s["end"], "bytes": s["bytes"],
                     "bits_per_second": s["bits_per_second"],
                     "retransmits": s.get("retransmits"), "lost_percent": s.get("lost_percent")})
    df = pd.DataFrame(rows)
    end = data["end"]
    if udp:
        s = end["sum"]
        df.attrs.update(sender_bps=s["bits_per_second"],
                        receiver_bps=s["bits_per_second"] * (1 - s.get("lost_percent", 0) / 100),
                        lost_percent=s.get("lost_percent"), retransmits=None,
                        packets=s.get("packets"), lost_packets=s.get("lost_packets"))
    else:
        df.attrs.update(sender_bps=end["sum_sent"]["bits_per_second"],
                        receiver_bps=end["sum_received"]["bits_per_second"],
                        retransmits=end["sum_sent"].get("retransmits"), lost_percent=None)
    df.attrs["client"], df.attrs["server"] = client.name, server.name
    return df
