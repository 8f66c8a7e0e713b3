"""The run ledger: /run/testbed/<run-id>.json, written before a run creates anything.

It names the run's namespaces (all tb-<run-id>-*), its processes and the owning process
(pid and start time, so a recycled pid is not taken for a live run). Network writes and
removes it; `testbed cleanup` reads it to remove what a SIGKILLed run left behind.
"""

from __future__ import annotations

import json
import os
import time

LEDGER_DIR = "/run/testbed"
PREFIX = "tb-"  # every namespace a run makes is named PREFIX + run id + "-" + ...


def ledger_path(run_id: str) -> str:
    return os.path.join(LEDGER_DIR, f"{run_id}.json")


def proc_start_time(pid: int):
    """The start time of pid in clock ticks since boot (None if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def write(run_id: str, topology: str, namespaces: list, pids: list, log_dir: str) -> None:
    """Write (atomically) the ledger of run_id, owned by this process."""
    os.makedirs(LEDGER_DIR, exist_ok=True)
    data = {"run_id": run_id, "pid": os.getpid(), "pid_start": proc_start_time(os.getpid()),
            "started": time.time(), "topology": topology, "namespaces": namespaces,
            "pids": pids, "log_dir": log_dir}
    tmp = ledger_path(run_id) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, ledger_path(run_id))


def remove(run_id: str) -> None:
    """Delete the ledger of run_id (nothing if there is none)."""
    try:
        os.unlink(ledger_path(run_id))
    except FileNotFoundError:
        pass


def runs() -> list:
    """Ledgers of runs, each with 'alive': is the owning process still running?"""
    out = []
    if not os.path.isdir(LEDGER_DIR):
        return out
    for f in sorted(os.listdir(LEDGER_DIR)):
        if not f.endswith(".json"):
            continue
        try:
            with open(os.path.join(LEDGER_DIR, f)) as fh:
                led = json.load(fh)
        except (OSError, json.JSONDecodeError):
            continue
        start = proc_start_time(led.get("pid", -1))
        led["alive"] = start is not None and start == led.get("pid_start", start)
        out.append(led)
    return out


__all__ = ["LEDGER_DIR", "PREFIX", "ledger_path", "proc_start_time", "write", "remove", "runs"]
