"""UDP request/reply probe for outage measurements (a request every 10 ms by default)."""

from __future__ import annotations

import os
import sys

import pandas as pd

from testbed.process import listening, log_matches


def udp_probe(client, server, seconds: float, interval_ms: float = 10, port: int = 9999,
              server_name=None, during=None) -> pd.DataFrame:
    """Probe server from client (Nodes) for `seconds`, a request every interval_ms; once the
    probe runs, call during() (inject the fault there). One row per request: seq, t_send,
    t_recv (NaN if lost), rtt_ms, responder (the name of the server that answered)."""
    srv = server.start([sys.executable, "-m", "testbed.measure.udpecho", "server", "--port",
                        str(port), "--name", server_name or server.name],
                       name=f"udpecho{port}", ready=listening(server.ns, port, "udp"))
    out = os.path.join(client.net.log_dir, f"udpprobe-{client.name}-{port}.csv")
    try:
        p = client.start([sys.executable, "-m", "testbed.measure.udpecho", "client", "--dst",
                          server.ip_toward(client), "--port", str(port), "--interval-ms",
                          str(interval_ms), "--seconds", str(seconds), "--out", out],
                         name=f"udpprobe{port}")
        p.wait_ready(log_matches(lambda: p, "probing"), timeout=15)
        if during is not None:
            during()
        p.wait(seconds + 30)
    finally:
        srv.stop()
    return pd.read_csv(out)


def outages(df: pd.DataFrame, interval_ms: float = 10) -> pd.DataFrame:
    """Gaps in the replies: one row per run of lost requests, with the time from the last
    reply before it to the first reply after it (the interruption a client sees)."""
    got = df[df["t_recv"].notna()].reset_index(drop=True)
    rows = []
    for i in range(1, len(got)):
        lost = int(got.loc[i, "seq"] - got.loc[i - 1, "seq"] - 1)
        if lost > 0:
            rows.append({"after_seq": int(got.loc[i - 1, "seq"]), "lost": lost,
                         "gap_ms": (got.loc[i, "t_recv"] - got.loc[i - 1, "t_recv"]) * 1000,
                         "from": got.loc[i - 1, "responder"], "to": got.loc[i, "responder"]})
    return pd.DataFrame(rows, columns=["after_seq", "lost", "gap_ms", "from", "to"])
