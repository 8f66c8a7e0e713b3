"""Shared by experiments/overlay_*.py (paper 004): run one paced stream A -> Z over kernel
TCP (testbed.measure.msgstream) or over the overlay (testbed.overlay.tool) on a running
Network and return its per-message one-way delays; summarize delays against the paper's
absolute thresholds and thresholds relative to a measured no-loss baseline."""

from __future__ import annotations

import itertools
import json
import os
import sys

import numpy as np
import pandas as pd

from testbed.process import file_exists

_ports = itertools.count(20000)
MODES = {"e2e": "best_effort", "hbh": "reliable"}  # overlay session over these links


def _last_json(proc) -> dict:
    return json.loads(proc.log().strip().splitlines()[-1])


def tcp_stream(net, src: str, dst: str, rate_kbit: float, seconds: float, cc: str,
               sack: bool, size: int = 1000) -> tuple:
    """Kernel TCP, congestion control cc, SACK on/off on both ends. -> (delays ms, info)."""
    for n in (src, dst):
        net[n].set_sysctl("net.ipv4.tcp_sack", int(sack))
    port = next(_ports)
    csv = os.path.join(net.log_dir, f"tcp{port}.csv")
    ready = os.path.join(net.log_dir, f"tcp{port}.ready")
    rx = net[dst].start([sys.executable, "-m", "testbed.measure.msgstream", "recv", "--port",
                         str(port), "--out", csv, "--ready-file", ready],
                        name=f"msgrecv{port}", ready=file_exists(ready))
    tx = net[src].start([sys.executable, "-m", "testbed.measure.msgstream", "send", "--dst",
                         net[dst].ip_toward(net[src]), "--port", str(port), "--rate-kbit",
                         str(rate_kbit), "--seconds", str(seconds), "--size", str(size),
                         "--cc", cc, "--nodelay"], name=f"msgsend{port}")
    tx.wait(seconds + 120)
    rx.wait(60)
    info = {**_last_json(tx), **_last_json(rx)}
    df = pd.read_csv(csv)
    return df["delay_ms"].to_numpy(), info


def overlay_stream(net, ov, src: str, dst: str, rate_kbit: float, seconds: float,
                   mode: str, size: int = 1000) -> tuple:
    """The overlay's reliable FIFO session src -> dst over best-effort links (mode "e2e":
    end-to-end recovery) or reliable links (mode "hbh": hop-by-hop). -> (delays, info)."""
    port = next(_ports) % 60000 + 1
    csv = os.path.join(net.log_dir, f"ov{port}.csv")
    ready = os.path.join(net.log_dir, f"ov{port}.ready")
    rx = net[dst].start([sys.executable, "-m", "testbed.overlay.tool", "recv", "--control",
                         ov.control_path(dst), "--port", str(port), "--out", csv,
                         "--idle", "3", "--seconds", str(seconds + 90),
                         "--ready-file", ready], name=f"ovrecv{port}", ready=file_exists(ready))
    tx = net[src].start([sys.executable, "-m", "testbed.overlay.tool", "send", "--control",
                         ov.control_path(src), "--dst", f"{ov.id(dst)}:{port}", "--seconds",
                         str(seconds), "--size", str(size), "--rate-kbit", str(rate_kbit),
                         "--link", MODES[mode], "--wait-acked", "60"], name=f"ovsend{port}")
    tx.wait(seconds + 120)
    rx.wait(120)
    sent, got = _last_json(tx), _last_json(rx)
    info = {"sent": sent["sent"], "received": got["received"],
            "duplicates": got["duplicates"], "in_order": got["in_order"]}
    df = pd.read_csv(csv)
    return df["delay_ms"].to_numpy(), info


def summarize(d, base: float | None = None) -> dict:
    """Mean, median, jitter (standard deviation, and mean |difference| of consecutive
    messages), % above 60 and 100 ms, and % above base+10 / base+50 ms if a baseline is
    given (base: the no-loss median of the same mode)."""
    d = np.asarray(d, dtype=float)
    if not len(d):
        return {"n": 0}
    out = {"n": int(len(d)), "mean_ms": round(float(d.mean()), 2),
           "median_ms": round(float(np.median(d)), 2),
           "p99_ms": round(float(np.percentile(d, 99)), 2),
           "jitter_sd_ms": round(float(d.std()), 2),
           "jitter_ipdv_ms": round(float(np.abs(np.diff(d)).mean()), 2) if len(d) > 1 else 0.0,
           "pct_over_60": round(100 * float((d > 60).mean()), 2),
           "pct_over_100": round(100 * float((d > 100).mean()), 2)}
    if base is not None:
        out["base_ms"] = round(base, 2)
        out["pct_over_base10"] = round(100 * float((d > base + 10).mean()), 2)
        out["pct_over_base50"] = round(100 * float((d > base + 50).mean()), 2)
    return out
