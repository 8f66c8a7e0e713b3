"""Volumes: a single file (a disk image) or a directory of files, seen as blocks.

A volume is a list of (name, size) files: a file volume is one entry named "" (the path
itself), a directory volume one entry per regular file (relative paths, sorted). Blocks are
block_size bytes (the last block of a file may be shorter) and hashed with sha256.
"""

from __future__ import annotations

import hashlib
import os
import shutil

from testbed.mirror import wire

DEFAULT_BLOCK = 64 * 1024


class VolumeError(Exception):
    pass


def check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or \
            not 512 <= block_size <= 16 << 20 or block_size & (block_size - 1):
        raise VolumeError(f"block size must be a power of two from 512 B to 16 MiB, "
                          f"got {block_size!r}")
    return block_size


def files(path: str) -> list:
    """[(name, size)] of a volume: [("", size)] for a file, sorted relative paths for a dir."""
    if os.path.isfile(path):
        return [("", os.path.getsize(path))]
    if os.path.isdir(path):
        out = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for n in names:
                full = os.path.join(root, n)
                if os.path.isfile(full) and not os.path.islink(full):
                    out.append((os.path.relpath(full, path), os.path.getsize(full)))
        return sorted(out)
    raise VolumeError(f"no volume at {path!r} (need a file or a directory)")


def file_path(root: str, name: str) -> str:
    if name == "":
        return root
    if name.startswith("/") or ".." in name.split("/"):
        raise VolumeError(f"bad file name in volume: {name!r}")
    return os.path.join(root, name)


def nblocks(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


def block_hashes(path: str, block_size: int) -> list:
    """sha256 of each block of one file."""
    out = []
    with open(path, "rb") as f:
        while True:
            data = f.read(block_size)
            if not data:
                break
            out.append(hashlib.sha256(data).digest())
    return out


def hash_volume(path: str, block_size: int) -> tuple:
    """(files, [hashes per file]) of a volume."""
    fl = files(path)
    return fl, [block_hashes(file_path(path, n), block_size) for n, _ in fl]


def volume_manifest(path: str, block_size: int = DEFAULT_BLOCK) -> str:
    """Hex manifest of a volume (what a mirror must equal after a sync)."""
    _, hl = hash_volume(path, block_size)
    return wire.manifest(hl).hex()


def read_block(path: str, index: int, block_size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(index * block_size)
        return f.read(block_size)


def snapshot(path: str, dest: str) -> str:
    """A point-in-time copy of the volume to read blocks from while it keeps changing (the
    paper used LVM snapshots; a copy is the portable equivalent)."""
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    elif os.path.exists(dest):
        os.unlink(dest)
    if os.path.isdir(path):
        shutil.copytree(path, dest, symlinks=False)
    else:
        shutil.copyfile(path, dest)
    return dest


def remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
