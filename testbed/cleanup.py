"""Remove what a killed run left behind: its processes and namespaces, by its ledger.

Every run writes /run/testbed/<run-id>.json before it creates anything, listing the
namespaces it will make (all named tb-<run-id>-*; see testbed.ledger). `testbed cleanup`
removes the runs whose owning process is gone; it never touches a namespace it cannot tie
to a run id.
"""

from __future__ import annotations

import os
import signal

from testbed import ledger
from testbed.kernel import netns as kns
from testbed.ledger import PREFIX, runs
from testbed.poll import WaitTimeout, wait_until


def kill_in(namespaces: list, timeout: float = 5.0) -> None:
    """KILL whatever still runs inside these namespaces (children that escaped their group),
    until nothing does or timeout seconds (scaled by TESTBED_TIMEOUT_SCALE) have passed."""

    def none_left() -> bool:
        pids = kns.pids_in(namespaces)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return not pids

    try:
        wait_until(none_left, timeout, "processes in the run's namespaces to die", interval=0.02)
    except WaitTimeout:
        pass  # deleting the namespaces follows; what still runs there is reported by it


def unledgered() -> list:
    """Namespaces with our prefix that no ledger names (reported, removed only by run id)."""
    known = {ns for led in runs() for ns in led.get("namespaces", [])}
    return [n for n in kns.show(PREFIX) if n not in known and not n.startswith("tb-probe-")]


def remove_run(run_id: str, namespaces=None) -> list:
    """Kill the processes in and delete the namespaces of one run. Returns what it removed."""
    mine = f"{PREFIX}{run_id}-"
    names = sorted({n for n in (namespaces if namespaces is not None else kns.show(mine))
                    if n.startswith(mine) and kns.exists(n)})
    kill_in(names)
    kns.delete(names)
    ledger.remove(run_id)
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
