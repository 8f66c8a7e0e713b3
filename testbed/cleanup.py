"""Remove what a killed run left behind: its processes and namespaces, by its ledger.

Every run writes /run/testbed/<run-id>.json before it creates anything, listing the
namespaces it will make (all named tb-<run-id>-*). `testbed cleanup` removes the runs whose
owning process is gone; it never touches a namespace it cannot tie to a run id.
"""

from __future__ import annotations

import json
import os

from testbed.kernel import netns as kns
from testbed.network import LEDGER_DIR, PREFIX, _kill_in


def proc_start_time(pid: int):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


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


def unledgered() -> list:
    """Namespaces with our prefix that no ledger names (reported, removed only by run id)."""
    known = {ns for led in runs() for ns in led.get("namespaces", [])}
    return [n for n in kns.show(PREFIX) if n not in known and not n.startswith("tb-probe-")]


def remove_run(run_id: str, namespaces=None) -> list:
    """Kill the processes in and delete the namespaces of one run. Returns what it removed."""
    mine = f"{PREFIX}{run_id}-"
    names = sorted({n for n in (namespaces if namespaces is not None else kns.show(mine))
                    if n.startswith(mine) and kns.exists(n)})
    _kill_in(names)
    kns.delete(names)
    try:
        os.unlink(os.path.join(LEDGER_DIR, f"{run_id}.json"))
    except FileNotFoundError:
        pass
    return names


def cleanup(run_id=None, include_live: bool = False) -> list:
    """Remove dead runs (or one run by id). Returns [(run_id, [namespaces removed])]."""
    done = []
    for led in runs():
        rid = led["run_id"]
        if run_id is not None and rid != run_id:
            continue
        if led["alive"] and not include_live and run_id is None:
            continue
        done.append((rid, remove_run(rid, led.get("namespaces", []) + kns.show(
            f"{PREFIX}{rid}-"))))
    if run_id is not None and not done:
        removed = remove_run(run_id)
        if removed:
            done.append((run_id, removed))
    return done
