"""Supervised processes inside a node: argv, log file, readiness probe, stop.

One process per argv, each with its own log file; no shell, no prompt parsing. Stopping is
TERM to the whole process group, a grace period, then KILL, then reap.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from typing import Callable, Optional, Sequence

from testbed.errors import TestbedError
from testbed.kernel import netns as kns
from testbed.poll import TIMEOUT_SCALE, WaitTimeout, wait_until
from testbed.run import run

__all__ = ["Process", "TIMEOUT_SCALE", "file_exists", "log_matches", "listening"]


class Process:
    """A process started in a namespace. Use Node.start() rather than making one directly."""

    def __init__(self, argv: Sequence[str], ns: str, log_path: str, name: str,
                 env: Optional[dict] = None, cwd: Optional[str] = None):
        self.argv = [str(a) for a in argv]
        self.ns = ns
        self.name = name
        self.log_path = log_path
        enter, fd = kns.preexec(ns)
        self._log = open(log_path, "ab")
        try:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                preexec_fn=enter, start_new_session=True, env=env, cwd=cwd, close_fds=True)
        except FileNotFoundError:
            self._log.close()
            raise TestbedError(f"{name}: command not found: {self.argv[0]}") from None
        finally:
            os.close(fd)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.poll()

    def log(self, tail: int = 0) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                text = f.read()
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-tail:]) if tail else text

    def wait_ready(self, probe: Callable[[], bool], timeout: float = 10.0,
                   interval: float = 0.01) -> "Process":
        """Poll probe() until true; fail early with the log tail if the process dies."""

        def died():
            if not self.alive:
                return (f"{self.name} exited with {self.returncode} before it was "
                        f"ready: {self.log(tail=3).strip() or '(empty log)'}")
            return None

        try:
            wait_until(probe, timeout, f"{self.name} ready", interval, abort=died)
        except WaitTimeout:
            raise TestbedError(f"{self.name} not ready after {timeout * TIMEOUT_SCALE:g} s "
                               f"(log {self.log_path})") from None
        return self

    def wait(self, timeout: Optional[float] = None) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TestbedError(f"{self.name} still running after {timeout:g} s") from None

    def signal(self, sig: int) -> None:
        if self.alive:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 3.0) -> Optional[int]:
        """TERM the process group, wait up to grace seconds, then KILL; always reap."""
        if self.alive:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        else:  # reap anything left in the group (children of a dead leader)
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()
        return self.popen.returncode


# readiness probes -------------------------------------------------------------------------

def file_exists(path: str) -> Callable[[], bool]:
    return lambda: os.path.exists(path)


def log_matches(proc_getter: Callable[[], "Process"], pattern: str) -> Callable[[], bool]:
    rx = re.compile(pattern)
    return lambda: bool(rx.search(proc_getter().log()))


def listening(ns: str, port: int, proto: str = "tcp") -> Callable[[], bool]:
    """True once something in namespace ns listens on port (from `ss`)."""
    flag = "-Hltn" if proto == "tcp" else "-Hlun"

    def probe() -> bool:
        out = run(["ss", flag, f"sport = :{port}"], netns=ns, check=False).stdout
        return bool(out.strip())

    return probe
