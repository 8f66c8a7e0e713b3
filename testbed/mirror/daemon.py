"""The mirror's two ends: `Receiver` (the DR site's daemon, `serve`) and `sync()` (the
primary's sender), plus `status()` / `promote()` requests and the heartbeat check.

The receiver never writes the mirror in place: blocks go to a staged copy (file volume:
`<mirror>.staging`; directory volume: a new generation directory whose unchanged files are
hard links), which is fsynced, checked against the sender's manifest and then made the
mirror by one rename (os.replace of the file, or of a symlink `<mirror>` -> generation). A
truncated or corrupted stream, a lost link (idle timeout) or a refused END discards the
staging: the mirror is exactly as it was. One sync at a time per mirror: a lock held for
the whole session (thread lock plus flock on `<mirror>.lock`), a second one is refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import shutil
import socket
import socketserver
import stat
import threading
import time
from typing import Callable, Optional

from testbed.kernel.sockq import send_queue_bytes
from testbed.mirror import volume as vol
from testbed.mirror import wire
from testbed.mirror.bucket import TokenBucket
from testbed.mirror.wire import Message, WireError

log = logging.getLogger("testbed.mirror")
IDLE, SYNCING, PROMOTED_STATE = 0, 1, 2
SLICE = 16384  # bytes handed to the socket (and the bucket) at a time


class MirrorError(Exception):
    """A refused or failed sync (the message says why); the mirror is untouched."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# receiver ---------------------------------------------------------------------------------

class Mirror:
    """The receiving side's state for one mirror path (file or directory volume)."""

    def __init__(self, path: str, expect_size: Optional[int] = None):
        self.path = os.path.abspath(path)
        self.expect_size = expect_size
        self.lock = threading.Lock()
        self.state = IDLE
        self.syncs = 0
        self.parent = os.path.dirname(self.path)
        os.makedirs(self.parent, exist_ok=True)
        self._flock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        self.kind = None  # "file" | "dir" once known
        if os.path.islink(self.path) or os.path.isdir(self.path):
            self.kind = "dir"
        elif os.path.isfile(self.path):
            self.kind = "file"
        self._cleanup_stale()

    def _cleanup_stale(self) -> None:
        """Staging left by a daemon that was killed mid-sync is never the mirror: drop it."""
        for n in os.listdir(self.parent):
            base = os.path.basename(self.path)
            if n.startswith(base + ".") and n.endswith(".staging"):
                vol.remove(os.path.join(self.parent, n))

    block_size = vol.DEFAULT_BLOCK
    _cache = None  # (block size, files, hashlists) of the committed mirror

    def current(self) -> tuple:
        """(files, hashlists) of the committed mirror (empty if none yet). Hashed once and
        then kept: only a commit changes the mirror (and it refreshes this)."""
        if not os.path.exists(self.path):
            return [], []
        if self._cache is None or self._cache[0] != self.block_size:
            self._cache = (self.block_size,) + vol.hash_volume(self.path, self.block_size)
        return self._cache[1], self._cache[2]

    def committed(self, files: list, hashlists: list) -> None:
        self._cache = (self.block_size, list(files), [list(h) for h in hashlists])

    def status(self) -> Message:
        size, man = 0, b"\0" * 32
        if os.path.exists(self.path):
            fl, hl = self.current()
            size, man = sum(s for _, s in fl), wire.manifest(hl)
        return Message(wire.STATUS, (self.state, size, self.block_size, self.syncs, man))

    def try_lock(self) -> Optional[str]:
        """None if this session now owns the mirror, else why not."""
        if self.state == PROMOTED_STATE:
            return "mirror has been promoted read-write: no more syncs"
        if not self.lock.acquire(blocking=False):
            return "busy: a sync of this mirror is already in progress"
        try:
            fcntl.flock(self._flock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.release()
            return "busy: another process is syncing this mirror"
        self.state = SYNCING
        return None

    def unlock(self) -> None:
        self.state = IDLE if self.state == SYNCING else self.state
        fcntl.flock(self._flock_fd, fcntl.LOCK_UN)
        self.lock.release()

    def promote(self) -> bytes:
        """Make the mirror writable and refuse further syncs (waits for a running sync)."""
        with self.lock:
            self.state = PROMOTED_STATE
            if os.path.exists(self.path):
                for root, _, names in (os.walk(os.path.realpath(self.path))
                                       if self.kind == "dir" else [("", [], [self.path])]):
                    for n in names:
                        p = os.path.join(root, n) if root else n
                        os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
                man = wire.manifest(self.current()[1])
                self._cache = None  # writable now: no longer only ours to change
                return man
            return b"\0" * 32


class Session:
    """One sync into a Mirror: BEGIN .. BLOCK* .. END; staged, then committed or discarded."""

    def __init__(self, mirror: Mirror, sock: socket.socket):
        self.m, self.sock = mirror, sock
        self.staging = None

    def run(self, begin: Message) -> bytes:
        """Stage and commit one sync; returns the committed manifest. The caller sends DONE
        only after releasing the mirror, so a sender that gets DONE can sync again at once."""
        mode, block_size, nfiles = begin.fields
        newfiles = begin.tail
        try:
            vol.check_block_size(block_size)
            for name, _ in newfiles:
                vol.file_path(self.m.path, name)
        except vol.VolumeError as e:
            raise MirrorError(str(e)) from None
        kind = "file" if len(newfiles) == 1 and newfiles[0][0] == "" else "dir"
        total = sum(s for _, s in newfiles)
        if self.m.kind is not None and kind != self.m.kind:
            raise MirrorError(f"wrong volume kind: sender has a {kind} volume, mirror is a "
                              f"{self.m.kind}")
        if self.m.expect_size is not None and total != self.m.expect_size:
            raise MirrorError(f"wrong volume size: sender has {total} bytes, mirror expects "
                              f"{self.m.expect_size}")
        if kind == "file" and os.path.isfile(self.m.path) and \
                os.path.getsize(self.m.path) != total:
            raise MirrorError(f"wrong volume size: sender has {total} bytes, mirror has "
                              f"{os.path.getsize(self.m.path)}")
        self.m.block_size = block_size
        cur_files, cur_hl = self.m.current()
        cur = dict(zip([n for n, _ in cur_files], cur_hl))
        old = [cur.get(n) for n, _ in newfiles]
        wire.send(self.sock, Message(wire.HASHES, (len(newfiles),), old))
        # the new volume's hashes start as the old ones (cut or padded to the new sizes)
        hl = []
        for (_, size), h in zip(newfiles, old):
            n = vol.nblocks(size, block_size)
            hl.append(None if h is None else list(h[:n]) + [None] * (n - len(h[:n])))
        written = [set() for _ in newfiles]
        self._stage_begin(kind, newfiles)
        handles = {}
        count = 0
        try:
            while True:
                msg = wire.recv(self.sock)
                if msg.type == wire.BLOCK:
                    fi, bi, digest = msg.fields
                    if fi >= len(newfiles):
                        raise MirrorError(f"block for file {fi}: the volume has {len(newfiles)}")
                    size = newfiles[fi][1]
                    n = vol.nblocks(size, block_size)
                    if bi >= n:
                        raise MirrorError(f"block {bi} of {newfiles[fi][0] or 'volume'}: it "
                                          f"has {n} blocks")
                    want = min(block_size, size - bi * block_size)
                    if len(msg.tail) != want:
                        raise MirrorError(f"block {bi}: {len(msg.tail)} bytes, expected {want}")
                    if wire.block_hash(msg.tail) != digest:
                        raise MirrorError(f"corrupted block {bi} of {newfiles[fi][0] or 'volume'}"
                                          f": sha256 mismatch")
                    f = handles.get(fi) or self._open_staged(fi, newfiles, handles)
                    f.seek(bi * block_size)
                    f.write(msg.tail)
                    if hl[fi] is None:
                        hl[fi] = [None] * n
                    hl[fi][bi] = digest
                    written[fi].add(bi)
                    count += 1
                elif msg.type == wire.END:
                    sent, man = msg.fields
                    if sent != count:
                        raise MirrorError(f"stream truncated: END says {sent} blocks, got {count}")
                    for i, h in enumerate(hl):
                        if h is None or any(x is None for x in h):
                            raise MirrorError(f"incomplete: {newfiles[i][0] or 'volume'} has "
                                              f"blocks that were never sent")
                    if wire.manifest(hl) != man:
                        raise MirrorError("manifest mismatch: the staged copy is not the "
                                          "sender's volume")
                    for f in handles.values():
                        f.flush()
                        os.fsync(f.fileno())
                        f.close()
                    handles.clear()
                    self._commit(kind, newfiles)
                    self.m.committed(newfiles, hl)
                    self.m.syncs += 1
                    log.info("commit: %d blocks, manifest %s", count, man.hex()[:16])
                    return man
                else:
                    raise MirrorError(f"unexpected {msg.name} during a sync")
        finally:
            for f in handles.values():
                f.close()
            self._discard()

    # staging ----------------------------------------------------------------------------
    def _stage_begin(self, kind: str, newfiles: list) -> None:
        if kind == "file":
            self.staging = self.m.path + ".staging"
            if os.path.isfile(self.m.path):
                shutil.copyfile(self.m.path, self.staging)
            with open(self.staging, "ab") as f:
                f.truncate(newfiles[0][1])
        else:
            self.staging = self.m.path + f".gen{time.time_ns()}.staging"
            os.makedirs(self.staging)
            for name, size in newfiles:  # unchanged files: hard links; others get copies later
                src = os.path.join(self.m.path, name)
                dst = os.path.join(self.staging, name)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                if os.path.isfile(src) and os.path.getsize(src) == size:
                    os.link(os.path.realpath(src), dst)
                else:
                    with open(dst, "wb") as f:
                        if os.path.isfile(src):
                            with open(src, "rb") as s:
                                shutil.copyfileobj(s, f)
                        f.truncate(size)

    def _open_staged(self, fi: int, newfiles: list, handles: dict):
        if self.staging.endswith(".staging") and os.path.isfile(self.staging):
            path = self.staging
        else:  # a directory volume: break the hard link before writing
            path = os.path.join(self.staging, newfiles[fi][0])
            if os.stat(path).st_nlink > 1:
                tmp = path + ".cow"
                shutil.copyfile(path, tmp)
                os.replace(tmp, path)
        f = open(path, "r+b")
        handles[fi] = f
        return f

    def _commit(self, kind: str, newfiles: list) -> None:
        if kind == "file":
            os.chmod(self.staging, 0o444)
            os.replace(self.staging, self.m.path)
        else:
            for name, _ in newfiles:
                p = os.path.join(self.staging, name)
                os.chmod(p, 0o444)
            gen = self.staging[:-len(".staging")]
            os.rename(self.staging, gen)
            _fsync_dir(gen)
            old = os.path.realpath(self.m.path) if os.path.islink(self.m.path) else None
            link = self.m.path + ".link-tmp"
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(os.path.basename(gen), link)
            os.replace(link, self.m.path)  # the one atomic step
            if old and old != gen:
                shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.m.parent)
        self.m.kind = kind
        self.staging = None

    def _discard(self) -> None:
        if self.staging:
            vol.remove(self.staging)
            self.staging = None


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        srv: "Receiver" = self.server  # type: ignore[assignment]
        sock = self.request
        sock.settimeout(srv.idle_timeout)
        peer = "%s:%d" % self.client_address
        try:
            while True:
                try:
                    msg = wire.recv(sock)
                except WireError as e:
                    if "closed after 0 of" in str(e):
                        return
                    raise
                if msg.type == wire.STATUS_REQ:
                    wire.send(sock, srv.mirror.status())
                elif msg.type == wire.PROMOTE:
                    man = srv.mirror.promote()
                    log.info("promoted read-write by %s", peer)
                    wire.send(sock, Message(wire.PROMOTED, (man,)))
                elif msg.type == wire.BEGIN:
                    why = srv.mirror.try_lock()
                    if why:
                        log.warning("refused sync from %s: %s", peer, why)
                        wire.send(sock, wire.error(why))
                        return
                    t0 = time.monotonic()
                    try:
                        man = Session(srv.mirror, sock).run(msg)
                    finally:
                        srv.mirror.unlock()
                    try:
                        wire.send(sock, Message(wire.DONE, (man,)))
                    except OSError as e:  # committed all the same: say so, not "untouched"
                        log.warning("sync from %s committed, but its DONE was not sent: %s",
                                    peer, e)
                        return
                    log.info("sync from %s done in %.2f s", peer, time.monotonic() - t0)
                else:
                    raise WireError(f"unexpected {msg.name}")
        except (MirrorError, WireError, OSError) as e:
            log.warning("sync from %s aborted, mirror untouched: %s", peer, e)
            try:
                wire.send(sock, wire.error(str(e)))
                # close gracefully: closing with unread data would reset the connection and
                # the sender would lose the reason; drain briefly while it notices
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(0.5)
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline and sock.recv(1 << 16):
                    pass
            except OSError:
                pass


class Receiver(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, mirror_path: str, host: str = "0.0.0.0", port: int = wire.DEFAULT_PORT,
                 idle_timeout: float = 5.0, expect_size: Optional[int] = None):
        self.mirror = Mirror(mirror_path, expect_size)
        self.idle_timeout = idle_timeout
        super().__init__((host, port), _Handler)


# sender -----------------------------------------------------------------------------------

def _connect(host: str, port: int, timeout: float) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def status(host: str, port: int = wire.DEFAULT_PORT, timeout: float = 2.0) -> dict:
    with _connect(host, port, timeout) as s:
        wire.send(s, Message(wire.STATUS_REQ))
        m = wire.expect(wire.recv(s), wire.STATUS)
    state, size, bs, syncs, man = m.fields
    return {"state": ["idle", "syncing", "promoted"][state], "size": size, "block_size": bs,
            "syncs": syncs, "manifest": man.hex()}


def promote(host: str, port: int = wire.DEFAULT_PORT, timeout: float = 10.0) -> str:
    with _connect(host, port, timeout) as s:
        wire.send(s, Message(wire.PROMOTE))
        return wire.expect(wire.recv(s), wire.PROMOTED).fields[0].hex()


def heartbeat(host: str, port: int = wire.DEFAULT_PORT, timeout: float = 2.0,
              alert: Optional[Callable[[str], None]] = None) -> Optional[dict]:
    """The paper's pre-sync check: the peer's status, or None after logging and alerting."""
    try:
        st = status(host, port, timeout)
    except (OSError, WireError) as e:
        msg = f"ALERT heartbeat: mirror peer {host}:{port} unreachable: {e}"
        log.error(msg)
        if alert:
            alert(msg)
        return None
    log.info("heartbeat: peer %s:%d %s, %d syncs", host, port, st["state"], st["syncs"])
    return st


def sync(volume_path: str, host: str, port: int = wire.DEFAULT_PORT,
         block_size: int = vol.DEFAULT_BLOCK, mode: str = "block",
         rate_mbit: Optional[float] = None, timeout: float = 5.0,
         snapshot: bool = True, corrupt_block: Optional[int] = None,
         truncate_after: Optional[int] = None) -> dict:
    """Send volume_path's changed blocks (mode 'block') or changed files whole ('file') to
    the receiver at host:port. Returns counters. corrupt_block / truncate_after are fault
    injections for tests (flip a byte of the n-th sent block / stop after n blocks)."""
    vol.check_block_size(block_size)
    if mode not in wire.MODES:
        raise MirrorError(f"mode must be block or file, got {mode!r}")
    if rate_mbit is not None and not 0 < rate_mbit <= 100000:
        raise MirrorError(f"rate_mbit must be in (0, 100000], got {rate_mbit!r}")
    if not os.path.exists(volume_path):
        raise MirrorError(f"no volume at {volume_path!r}")
    lock_fd = os.open(os.path.abspath(volume_path).rstrip("/") + ".sync.lock",
                      os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MirrorError(f"a sync of {volume_path} is already running") from None
        snap = volume_path.rstrip("/") + ".snap" if snapshot else volume_path
        t0 = time.monotonic()
        if snapshot:
            vol.snapshot(volume_path, snap)
        try:
            return _send(snap, host, port, block_size, mode, rate_mbit, timeout, t0,
                         corrupt_block, truncate_after)
        finally:
            if snapshot:
                vol.remove(snap)
    finally:
        os.close(lock_fd)


def _await_reply(s: socket.socket, idle_timeout: float) -> Message:
    """The receiver's answer to END. It comes once every byte in our send queue has reached
    the receiver and been committed, and on a shaped link (or one shared with background
    traffic) that queue holds seconds of data: so time out only when nothing has been
    acknowledged for idle_timeout s, as a receiver's idle timeout does."""
    last, deadline = None, time.monotonic() + idle_timeout
    while not select.select([s], [], [], 0.1)[0]:
        queued, now = send_queue_bytes(s), time.monotonic()
        if queued != last:
            last, deadline = queued, now + idle_timeout
        elif now > deadline:
            raise TimeoutError(f"no reply, and no byte acknowledged for {idle_timeout:g} s "
                               f"({queued} bytes still queued)")
    return wire.recv(s)


def _send(path, host, port, block_size, mode, rate_mbit, timeout, t0, corrupt_block,
          truncate_after) -> dict:
    fl, hl = vol.hash_volume(path, block_size)
    t_hashed = time.monotonic()
    bucket = TokenBucket(rate_mbit * 1e6) if rate_mbit else None
    stats = {"mode": mode, "block_size": block_size, "files": len(fl),
             "volume_bytes": sum(s for _, s in fl), "blocks_total": sum(len(h) for h in hl),
             "blocks_sent": 0, "files_sent": 0, "data_bytes": 0, "wire_bytes": 0,
             "hash_s": round(t_hashed - t0, 4)}
    try:
        s = _connect(host, port, timeout)
    except OSError as e:
        raise MirrorError(f"cannot reach mirror {host}:{port}: {e}") from None
    with s:
        try:
            stats["wire_bytes"] += wire.send(s, Message(wire.BEGIN, (wire.MODES[mode],
                                                                     block_size, len(fl)), fl))
            theirs = wire.expect(wire.recv(s), wire.HASHES, "the sync").tail
        except (OSError, WireError) as e:
            raise MirrorError(f"sync refused before any block was sent: {e}") from None
        if len(theirs) != len(fl):
            raise MirrorError(f"receiver sent {len(theirs)} hash lists for {len(fl)} files")
        todo = []
        for fi, (_, mine, other) in enumerate(zip(fl, hl, theirs)):
            changed = [bi for bi, h in enumerate(mine)
                       if other is None or bi >= len(other) or other[bi] != h]
            if mode == "file" and (changed or other is None or len(other) != len(mine)):
                changed = list(range(len(mine)))
            if changed:
                stats["files_sent"] += 1
            todo += [(fi, bi) for bi in changed]
        t_start = time.monotonic()
        stats["t_diff_s"] = round(t_start - t_hashed, 4)
        handles = {}
        try:
            for k, (fi, bi) in enumerate(todo):
                if truncate_after is not None and k >= truncate_after:
                    s.shutdown(socket.SHUT_WR)
                    break
                f = handles.get(fi) or handles.setdefault(
                    fi, open(vol.file_path(path, fl[fi][0]), "rb"))
                f.seek(bi * block_size)
                data = f.read(block_size)
                digest = hl[fi][bi]
                if corrupt_block is not None and k == corrupt_block:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                frame = wire.encode(Message(wire.BLOCK, (fi, bi, digest), data))
                for off in range(0, len(frame), SLICE):
                    piece = frame[off:off + SLICE]
                    if bucket:
                        bucket.consume(len(piece))
                    s.sendall(piece)
                stats["wire_bytes"] += len(frame)
                stats["data_bytes"] += len(data)
                stats["blocks_sent"] += 1
                if select.select([s], [], [], 0)[0]:  # the receiver only speaks to refuse
                    break
            else:
                stats["wire_bytes"] += wire.send(
                    s, Message(wire.END, (stats["blocks_sent"], wire.manifest(hl))))
            reply = _await_reply(s, timeout)
        except (OSError, WireError) as e:
            reason = _pending_error(s)
            if reason:
                raise MirrorError(f"mirror refused the sync: {reason}") from None
            raise MirrorError(f"sync aborted after {stats['blocks_sent']} of {len(todo)} "
                              f"blocks: {e}") from None
        finally:
            for f in handles.values():
                f.close()
        if reply.type == wire.ERROR:
            raise MirrorError(f"mirror refused the sync: {reply.tail}")
        wire.expect(reply, wire.DONE)
        t_end = time.monotonic()
        stats.update(transfer_s=round(t_end - t_start, 4), total_s=round(t_end - t0, 4),
                     manifest=wire.manifest(hl).hex(),
                     bucket_wait_s=round(bucket.waited_s, 3) if bucket else 0.0)
        stats["goodput_mbit"] = round(stats["data_bytes"] * 8 / 1e6 / stats["transfer_s"], 4) \
            if stats["transfer_s"] > 0 else None
    return stats


def _pending_error(s: socket.socket) -> Optional[str]:
    """The receiver's ERROR, if one arrived before the connection failed."""
    try:
        s.settimeout(0.5)
        msg = wire.recv(s)
        return msg.tail if msg.type == wire.ERROR else None
    except (OSError, WireError):
        return None


def format_stats(stats: dict) -> str:
    return json.dumps(stats, sort_keys=True)
