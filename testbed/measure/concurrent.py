"""Several iperf3 TCP flows at once between two nodes, one per server port, measured at the
receiver: what a link's scheduler gave each flow, interval by interval."""

from __future__ import annotations

import json
import os
import secrets
from typing import Optional, Sequence

import pandas as pd

from testbed.errors import SpecError, TestbedError
from testbed.process import TIMEOUT_SCALE, file_exists, listening


# Each client waits at a barrier (a shell polling for a flag file) and execs iperf3 when the
# flag appears: starting processes takes long on a slow machine (seconds under qemu TCG),
# and flows started one after the other would not share the link at all.
_BARRIER = 'touch "$0.$$"; while [ ! -e "$0" ]; do sleep 0.005; done; exec "$@"'


def iperf3_flows(client, server, ports: Sequence[int], seconds: float = 5,
                 interval: float = 0.5, durations: Optional[dict] = None,
                 congestion: Optional[str] = None) -> pd.DataFrame:
    """Run one iperf3 TCP flow from client to server (Node objects) per port, all started
    together: one iperf3 server per port, each ready first, then every client process
    waiting at a barrier, then all released at once.

    One row per flow and reporting interval, as the receiver counted it (iperf3
    --get-server-output), so a flow's bytes are what crossed the link, not what the sender
    wrote into its socket buffer: port, t_start, t_end (s since that flow's start), bytes,
    bits_per_second. durations: port -> seconds for flows that run longer or shorter than
    `seconds`. df.attrs["flows"]: port -> {receiver_bps, sender_bps, retransmits, bytes (as
    received while the test ran), bytes_sent (all the client wrote, which the network still
    delivers after the test: whatever was queued at its end)}.
    """
    ports = [int(p) for p in ports]
    if not ports or len(set(ports)) != len(ports):
        raise SpecError(f"iperf3_flows: give distinct ports, got {ports!r}")
    durations = {int(k): v for k, v in (durations or {}).items()}
    unknown = set(durations) - set(ports)
    if unknown:
        raise SpecError(f"iperf3_flows: durations for ports not in the flows: {sorted(unknown)}")
    work = os.path.join(client.net.log_dir, f"iperf3-flows-{secrets.token_hex(3)}")
    flag = work + ".go"
    servers, clients = [], []
    try:
        for p in ports:
            # -J and -i on the server too: its intervals come back with the client's output
            servers.append(server.start(["iperf3", "-s", "-1", "-J", "-i", f"{interval:g}",
                                         "-p", str(p)],
                                        name=f"iperf3-s{p}", ready=listening(server.ns, p)))
        dst = server.ip_toward(client)
        for p in ports:
            argv = ["iperf3", "-c", dst, "-p", str(p), "-J", "--get-server-output",
                    "--logfile", f"{work}.{p}.json", "-t", f"{durations.get(p, seconds):g}",
                    "-i", f"{interval:g}"] + (["-C", congestion] if congestion else [])
            proc = client.start(["sh", "-c", _BARRIER, flag] + argv, name=f"iperf3-c{p}")
            proc.wait_ready(file_exists(f"{flag}.{proc.pid}"))
            clients.append((p, proc))
        open(flag, "w").close()  # go
        for p, proc in clients:
            proc.wait(timeout=durations.get(p, seconds) + 30 * TIMEOUT_SCALE)
    finally:
        for _, proc in clients:
            proc.stop()
        for s in servers:
            s.stop()
    results = []
    for p, proc in clients:
        try:
            with open(f"{work}.{p}.json") as f:
                results.append((p, f.read()))
        except OSError:
            raise TestbedError(f"iperf3 {client.name}->{server.name}:{p} wrote no output "
                               f"(exit {proc.returncode}: {proc.log(tail=3).strip()})") from None
    for path in [flag] + [f"{flag}.{proc.pid}" for _, proc in clients]:
        try:
            os.unlink(path)
        except OSError:
            pass
    rows, flows = [], {}
    for port, text in results:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise TestbedError(f"iperf3 {client.name}->{server.name}:{port}: no JSON output "
                               f"({text.strip()[-200:]})") from None
        if "error" in data:
            raise TestbedError(f"iperf3 {client.name}->{server.name}:{port}: {data['error']}")
        srv = data.get("server_output_json") or {}
        intervals = srv.get("intervals")
        if not intervals:
            raise TestbedError(f"iperf3 {client.name}->{server.name}:{port}: no server "
                               f"intervals in the output (iperf3 too old for "
                               f"--get-server-output?)")
        for iv in intervals:
            s = iv["sum"]
            rows.append({"port": port, "t_start": s["start"], "t_end": s["end"],
                         "bytes": s["bytes"], "bits_per_second": s["bits_per_second"]})
        end = data["end"]
        flows[port] = {"receiver_bps": end["sum_received"]["bits_per_second"],
                       "sender_bps": end["sum_sent"]["bits_per_second"],
                       "retransmits": end["sum_sent"].get("retransmits"),
                       "bytes": end["sum_received"]["bytes"],
                       "bytes_sent": end["sum_sent"]["bytes"]}
    df = pd.DataFrame(rows)
    df.attrs["flows"] = flows
    df.attrs["client"], df.attrs["server"] = client.name, server.name
    return df


def window(df: pd.DataFrame, t_from: float, t_to: float) -> pd.DataFrame:
    """The intervals whose midpoint lies in [t_from, t_to] (by each flow's own clock; the
    flows start within milliseconds of each other)."""
    mid = (df.t_start + df.t_end) / 2
    return df[(mid >= t_from) & (mid <= t_to)]


def rates_bps(df: pd.DataFrame, t_from: float, t_to: float) -> dict:
    """Port -> its receiver goodput (bits/s) over the intervals in [t_from, t_to]."""
    w = window(df, t_from, t_to)
    g = w.assign(seconds=w.t_end - w.t_start).groupby("port")[["bytes", "seconds"]].sum()
    return {int(p): 8 * float(r.bytes) / float(r.seconds) for p, r in g.iterrows()
            if r.seconds > 0}


def shares(df: pd.DataFrame, t_from: float, t_to: float) -> dict:
    """Port -> its fraction of all bytes received in the intervals in [t_from, t_to]."""
    per = window(df, t_from, t_to).groupby("port")["bytes"].sum()
    total = per.sum()
    if total <= 0:
        raise TestbedError(f"no bytes received between {t_from:g} and {t_to:g} s")
    return {int(p): float(b) / total for p, b in per.items()}


__all__ = ["iperf3_flows", "rates_bps", "shares", "window"]
