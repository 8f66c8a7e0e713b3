"""Files that readers poll (ready files, status files, results written by daemons): written
whole or not at all, by a rename, so a reader never sees half of one. Light on imports:
daemons started as `python -m ...` use it."""

from __future__ import annotations

import json
import os


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json_atomic(path: str, data) -> None:
    write_atomic(path, json.dumps(data) + "\n")


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ready_file:
    """`with ready_file(path, info):` writes a ready file (JSON: pid and info) on entry,
    for the harness's readiness probe, and removes it on exit, however the daemon ends.
    A path of None does nothing, for daemons started without --ready-file."""

    def __init__(self, path, info: dict = None):
        self.path, self.info = path, dict(info or {})

    def __enter__(self) -> "ready_file":
        if self.path:
            write_json_atomic(self.path, {"pid": os.getpid(), **self.info})
        return self

    def __exit__(self, *exc) -> None:
        if self.path:
            remove_quietly(self.path)
