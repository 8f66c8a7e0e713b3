"""Shared HMAC keys: always hex text in a 0600 file, written whole by a rename."""

from __future__ import annotations

import os
import secrets

from testbed.daemon.args import UsageError

MIN_KEY_BYTES = 16


def new_key(nbytes: int = 32) -> bytes:
    return secrets.token_bytes(nbytes)


def write_key(path: str, key: bytes) -> str:
    """Write key (bytes) as hex to path, mode 0600, atomically; returns path."""
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    os.replace(tmp, path)
    return path


def read_key(path: str, min_bytes: int = MIN_KEY_BYTES) -> bytes:
    """The key in path (hex, at least min_bytes); UsageError naming the problem."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read key file {path}: {e}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{path} must hold the key in hex") from None
    if len(key) < min_bytes:
        raise UsageError(f"the key in {path} must be at least {min_bytes} bytes")
    return key
