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
               sack: bool, size: int = 1000, probe=None) -> tuple:
    """Kernel TCP, congestion control cc, SACK on/off on both ends. -> (delays ms, info).
    probe: an overlay (testbed.overlay.start_overlay) to send a probe on (see
    overlay_stream)."""
    for n in (src, dst):
        net[n].set_sysctl("net.ipv4.tcp_sack", int(sack))
    port = next(_ports)
    csv = os.path.join(net.log_dir, f"tcp{port}.csv")
    ready = os.path.join(net.log_dir, f"tcp{port}.ready")
    rx = net[dst].start([sys.executable, "-m", "testbed.measure.msgstream", "recv", "--port",
                         str(port), "--out", csv, "--ready-file", ready],
                        name=f"msgrecv{port}", ready=file_exists(ready))
    pr = _start_probe(net, probe, src, dst, rate_kbit, seconds, size) if probe else None
    tx = net[src].start([sys.executable, "-m", "testbed.measure.msgstream", "send", "--dst",
                         net[dst].ip_toward(net[src]), "--port", str(port), "--rate-kbit",
                         str(rate_kbit), "--seconds", str(seconds), "--size", str(size),
                         "--cc", cc, "--nodelay"], name=f"msgsend{port}")
    tx.wait(seconds + 120)
    rx.wait(60)
    info = {**_last_json(tx), **_last_json(rx)}
    df = pd.read_csv(csv)
    if pr:
        _finish_probe(pr, seconds, df, info)
    return df["delay_ms"].to_numpy(), info


def overlay_recv(net, ov, dst: str, port: int, seconds: float, per_message: bool = True,
                  idle: float = 3):
    """Start the overlay tool's receiver on dst:port, ready once bound. per_message: write
    each message's delay to a CSV (its path is returned; None without)."""
    csv = os.path.join(net.log_dir, f"ov{port}.csv") if per_message else None
    ready = os.path.join(net.log_dir, f"ov{port}.ready")
    argv = [sys.executable, "-m", "testbed.overlay.tool", "recv", "--control",
            ov.control_path(dst), "--port", str(port), "--idle", str(idle),
            "--seconds", str(seconds + 90), "--ready-file", ready]
    argv += ["--out", csv] if csv else []
    rx = net[dst].start(argv, name=f"ovrecv{port}", ready=file_exists(ready))
    return rx, csv


def overlay_send(net, ov, src: str, dst: str, port: int, rate_kbit: float, seconds: float,
                  size: int, link: str, datagram: bool, wait_acked: float = 60):
    argv = [sys.executable, "-m", "testbed.overlay.tool", "send", "--control",
            ov.control_path(src), "--dst", f"{ov.id(dst)}:{port}", "--seconds", str(seconds),
            "--size", str(size), "--rate-kbit", str(rate_kbit), "--link", link]
    argv += ["--datagram"] if datagram else ["--wait-acked", str(wait_acked)]
    return net[src].start(argv, name=f"ovsend{port}")


def overlay_stream(net, ov, src: str, dst: str, rate_kbit: float, seconds: float,
                   mode: str, size: int = 1000, probe: bool = False) -> tuple:
    """The overlay's reliable FIFO session src -> dst over best-effort links (mode "e2e":
    end-to-end recovery) or reliable links (mode "hbh": hop-by-hop). -> (delays, info).

    probe: at the same time, a paced stream of best-effort datagrams along the same path
    (same rate and size, no recovery: a lost one is just missing). Its delays are the
    machine's own at that moment (delay lines, daemons, scheduling, the hypervisor), with
    nothing of the protocols' recovery in them: info["probe_delays"]."""
    port = next(_ports) % 60000 + 1
    rx, csv = overlay_recv(net, ov, dst, port, seconds)
    pr = _start_probe(net, ov, src, dst, rate_kbit, seconds, size) if probe else None
    tx = overlay_send(net, ov, src, dst, port, rate_kbit, seconds, size, MODES[mode], False)
    tx.wait(seconds + 120)
    rx.wait(120)
    sent, got = _last_json(tx), _last_json(rx)
    info = {"sent": sent["sent"], "received": got["received"],
            "duplicates": got["duplicates"], "in_order": got["in_order"]}
    df = pd.read_csv(csv)
    if pr:
        _finish_probe(pr, seconds, df, info)
    return df["delay_ms"].to_numpy(), info


def _start_probe(net, ov, src: str, dst: str, rate_kbit: float, seconds: float,
                 size: int) -> tuple:
    port = next(_ports) % 60000 + 1
    rx, csv = overlay_recv(net, ov, dst, port, seconds)
    tx = overlay_send(net, ov, src, dst, port, rate_kbit, seconds, size, "best_effort", True)
    return tx, rx, csv


def _finish_probe(probe: tuple, seconds: float, stream: pd.DataFrame, info: dict) -> None:
    """Wait for the probe; info["probe_delays"] and info["machine_ms"] (machine_excess)."""
    tx, rx, csv = probe
    tx.wait(seconds + 60)
    rx.wait(60)
    pdf = pd.read_csv(csv)
    info["probe_delays"] = pdf["delay_ms"].to_numpy()
    info["machine_ms"] = machine_excess(stream, pdf)


def machine_excess(stream: pd.DataFrame, probe: pd.DataFrame) -> np.ndarray:
    """For each stream message, the machine's own delay at the time it was sent: the delay
    of the probe datagram sent nearest in time, above the probe's fastest (ms). The fastest
    probe is the path on a quiet moment (propagation, serialization, the least Python);
    stream - this is each message's delay on such a path: what the machine adds (a busy
    moment, the hypervisor's steal, a slow stretch of a whole run) taken out, what the
    protocol's recovery adds kept."""
    st = stream["t_send"].to_numpy()
    if not len(probe):
        return np.zeros(len(st))
    order = np.argsort(probe["t_send"].to_numpy())
    pt = probe["t_send"].to_numpy()[order]
    pdly = probe["delay_ms"].to_numpy()[order]
    i = np.clip(np.searchsorted(pt, st), 1, max(1, len(pt) - 1))
    left = np.clip(i - 1, 0, len(pt) - 1)
    right = np.clip(i, 0, len(pt) - 1)
    near = np.where(np.abs(pt[left] - st) <= np.abs(pt[right] - st), left, right)
    return pdly[near] - float(pdly.min())


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
