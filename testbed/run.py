"""The one subprocess entry point: run argv (optionally inside a namespace), raise on failure."""

from __future__ import annotations

import subprocess
from typing import Optional, Sequence

from testbed.errors import CommandError


def netns_argv(argv: Sequence[str], netns: Optional[str]) -> list[str]:
    """argv prefixed to run inside a named namespace (nsenter is cheaper than `ip netns exec`)."""
    argv = [str(a) for a in argv]
    if netns is None:
        return argv
    return ["nsenter", f"--net=/run/netns/{netns}", "--"] + argv


def run(
    argv: Sequence[str],
    netns: Optional[str] = None,
    input: Optional[str] = None,
    timeout: Optional[float] = 60,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run argv to completion; raise CommandError(argv, rc, out, err) if it fails and check."""
    full = netns_argv(argv, netns)
    try:
        proc = subprocess.run(
            full, input=input, capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError as e:
        raise CommandError(full, 127, "", f"command not found: {full[0]}") from e
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise CommandError(full, -1, out, f"timed out after {timeout} s") from e
    if check and proc.returncode != 0:
        raise CommandError(full, proc.returncode, proc.stdout, proc.stderr)
    return proc


def batch(tool: str, lines: Sequence[str], netns: Optional[str] = None) -> None:
    """Run many `ip`/`tc` commands in one process (`-force -batch -`): fast bulk set-up."""
    if not lines:
        return
    argv = [tool] + (["-n", netns] if netns else []) + ["-batch", "-"]
    run(argv, input="\n".join(lines) + "\n", timeout=600)
