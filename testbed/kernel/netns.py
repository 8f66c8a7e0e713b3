"""Named network namespaces (visible to `ip netns`), and entering them from Python.

Entering is per thread (setns(2) on a network namespace changes only the calling thread),
so a netlink socket opened inside `enter()` stays bound to that namespace afterwards.
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from typing import Iterable

from pyroute2 import IPRoute

from testbed.errors import TestbedError
from testbed.run import batch, run

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.Lock()


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def create(names: Iterable[str]) -> None:
    """Create namespaces in one `ip -batch` process (about 1 ms each)."""
    batch("ip", [f"netns add {n}" for n in names])


def delete(names: Iterable[str]) -> None:
    """Delete those of names that exist; their interfaces and netfilter rules go with them."""
    present = [n for n in names if exists(n)]
    if present:
        run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in present),
            check=False, timeout=600)
    left = [n for n in present if exists(n)]
    if left:
        raise TestbedError(f"could not delete namespaces: {', '.join(left)}")


def show(prefix: str = "") -> list:
    if not os.path.isdir(NETNS_DIR):
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def enter(name: str):
    """Run the body in namespace `name` (this thread only), then come back."""
    with _lock:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            fd = os.open(path(name), os.O_RDONLY)
        except FileNotFoundError:
            os.close(home)
            raise TestbedError(f"namespace {name} does not exist") from None
        try:
            setns(fd)
            try:
                yield
            finally:
                setns(home)
        finally:
            os.close(fd)
            os.close(home)


def ipr(name: str) -> IPRoute:
    """A pyroute2 IPRoute whose netlink socket lives in namespace `name` (no fork)."""
    with enter(name):
        return IPRoute()


def sysctl_path(key: str) -> str:
    """/proc/sys path of a dotted key, or of a slash-separated one (`net/ipv4/conf/eth0.10/
    proxy_arp`: the form to use when an interface name has a dot)."""
    return "/proc/sys/" + (key if "/" in key else key.replace(".", "/"))


def sysctl(name: str, key: str, value) -> str:
    """Set a sysctl (dotted key) inside namespace `name`; return the previous value."""
    p = sysctl_path(key)
    with enter(name):
        try:
            with open(p) as f:
                old = f.read().strip()
            with open(p, "w") as f:
                f.write(str(value))
        except OSError as e:
            raise TestbedError(f"sysctl {key}={value} in {name}: {e.strerror}") from None
    return old


def read_sysctls(name: str, keys: Iterable[str]) -> dict:
    """Current values of sysctls inside namespace `name` (dotted keys, or slash-separated
    for keys whose interface name has a dot); None for a key that does not exist there."""
    out = {}
    with enter(name):
        for key in keys:
            try:
                with open(sysctl_path(key)) as f:
                    out[key] = f.read().strip()
            except OSError:
                out[key] = None
    return out


def sysctls(name: str, settings: dict) -> None:
    """Set several sysctls inside namespace `name`, entering it once."""
    with enter(name):
        for key, value in settings.items():
            try:
                with open(sysctl_path(key), "w") as f:
                    f.write(str(value))
            except OSError as e:
                raise TestbedError(f"sysctl {key}={value} in {name}: {e.strerror}") from None


def pids(name: str) -> list:
    """PIDs of the processes whose network namespace is `name`."""
    out = run(["ip", "netns", "pids", name], check=False).stdout
    return [int(p) for p in out.split()]


def pids_in(names: Iterable[str]) -> list:
    """PIDs of every process inside any of these namespaces (one scan of /proc)."""
    inodes = set()
    for n in names:
        try:
            inodes.add(os.stat(path(n)).st_ino)
        except FileNotFoundError:
            pass
    if not inodes:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                found.append(int(entry))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            pass
    return found


def preexec(name: str):
    """A preexec_fn for subprocess that moves the child into namespace `name`."""
    fd = os.open(path(name), os.O_RDONLY)

    def _enter():
        setns(fd)

    return _enter, fd
