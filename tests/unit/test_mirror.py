"""Mirror unit tests (no root): golden wire frames, block diff, token bucket, and the
receiver's atomic commit over loopback TCP (a receiver thread in this process)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from testbed.mirror import daemon, volume, wire, workload
from testbed.mirror.bucket import TokenBucket
from testbed.mirror.wire import Message, WireError
from testbed.poll import wait_until

BS = 4096


# wire format: golden frames ---------------------------------------------------------------

def test_golden_status_req_and_end():
    assert wire.encode(Message(wire.STATUS_REQ)) == b"MR\x01\x00\x00\x00\x00"
    man = bytes(range(32))
    frame = wire.encode(Message(wire.END, (7, man)))
    assert frame == b"MR\x30\x00\x00\x00\x24" + b"\x00\x00\x00\x07" + man
    assert wire.decode(frame).fields == (7, man)


def test_golden_begin_with_files():
    frame = wire.encode(Message(wire.BEGIN, (0, 65536, 2), [("a", 5), ("d/b", 70000)]))
    want = (b"MR\x10\x00\x00\x00" + bytes([9 + 2 + 1 + 8 + 2 + 3 + 8])
            + b"\x00" + b"\x00\x01\x00\x00" + b"\x00\x00\x00\x02"
            + b"\x00\x01a" + (5).to_bytes(8, "big")
            + b"\x00\x03d/b" + (70000).to_bytes(8, "big"))
    assert frame == want
    m = wire.decode(frame)
    assert m.name == "BEGIN" and m.fields == (0, 65536, 2) and m.tail == [("a", 5), ("d/b", 70000)]


def test_golden_block_and_hashes_roundtrip():
    h = hashlib.sha256(b"xyz").digest()
    frame = wire.encode(Message(wire.BLOCK, (1, 2, h), b"xyz"))
    assert frame[:7] == b"MR\x20\x00\x00\x00" + bytes([8 + 32 + 3])
    assert frame[7:15] == b"\x00\x00\x00\x01\x00\x00\x00\x02" and frame.endswith(h + b"xyz")
    hl = Message(wire.HASHES, (2,), [None, [h, h]])
    frame = wire.encode(hl)
    assert frame[7:15] == b"\x00\x00\x00\x02\xff\xff\xff\xff"
    assert wire.decode(frame).tail == [None, [h, h]]


@pytest.mark.parametrize("frame, err", [
    (b"MR\x01\x00", "truncated header"),
    (b"XX\x01\x00\x00\x00\x00", "bad magic"),
    (b"MR\x55\x00\x00\x00\x00", "unknown message type"),
    (b"MR\x30\x00\x00\x00\x03abc", "payload of 3 bytes"),
    (b"MR\x11\x00\x00\x00\x08\x00\x00\x00\x01\x00\x00\x00\x02", "truncated hash list"),
    (b"MR\x01\x00\x00\x00\x05", "frame of 7 bytes"),
])
def test_malformed_frames_refused(frame, err):
    with pytest.raises(WireError, match=err):
        wire.decode(frame)


@pytest.mark.parametrize("sent, err", [
    (b"", "stream truncated: connection closed after 0 of 7 bytes"),
    (b"MR\x30", "stream truncated: connection closed after 3 of 7 bytes"),
    (b"MR\x31\x00\x00\x00\x20" + b"x" * 5, "stream truncated: connection closed after 5 of 32"),
    (b"XX\x01\x00\x00\x00\x00", "bad magic"),
])
def test_recv_from_a_stream_that_ends_or_lies(sent, err):
    a, b = socket.socketpair()
    with a, b:
        b.sendall(sent)
        b.close()
        with pytest.raises(WireError, match=err):
            wire.recv(a)


def test_recv_a_frame_in_pieces():
    a, b = socket.socketpair()
    frame = wire.encode(Message(wire.DONE, (b"m" * 32,)))
    with a, b:
        for i in range(len(frame)):
            b.send(frame[i:i + 1])
        assert wire.recv(a).fields == (b"m" * 32,)


def test_manifest_is_hash_of_block_hashes():
    a, b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    assert wire.manifest([[a], [b]]) == hashlib.sha256(a + b).digest()
    assert wire.manifest([[a, b]]) != wire.manifest([[b, a]])


# volume, workload ---------------------------------------------------------------------------

def test_block_hashes_and_changes(tmp_path):
    p = str(tmp_path / "vol.img")
    workload.make_volume(p, 10 * BS + 100, seed=3)
    before = volume.block_hashes(p, BS)
    assert len(before) == 11
    changed = workload.change(p, 30, BS, locality=0, seed=5)
    after = volume.block_hashes(p, BS)
    diff = [i for i, (x, y) in enumerate(zip(before, after)) if x != y]
    assert diff == changed and len(changed) == round(11 * 0.3)


def test_locality_clusters_blocks():
    import random

    def runs(blocks):
        return 1 + sum(1 for x, y in zip(blocks, blocks[1:]) if y != x + 1)

    spread = workload.pick_blocks(10000, 300, 0.0, random.Random(1))
    clustered = workload.pick_blocks(10000, 300, 1.0, random.Random(1))
    assert len(spread) == len(clustered) == 300
    assert runs(clustered) < runs(spread) / 5


def test_week_matches_paper():
    rates = list(workload.WEEK.values())
    assert min(rates) == workload.PAPER_MIN_PCT and max(rates) == workload.PAPER_MAX_PCT
    assert abs(sum(rates) / len(rates) - workload.PAPER_MEAN_PCT) < 1e-9


def test_capacity_model_matches_paper():
    day = workload.daily_capacity_gib(1.544, 0.85)
    assert round(day, 2) == 13.84
    assert round(workload.max_store_gib(day, 3.69)) == 375
    assert round(workload.max_store_gib(day, 2.32)) == 597  # paper truncates: 596
    assert round(workload.rate_for_store_mbit(1024, 3.69, 0.85), 2) == 4.21  # paper: 4.22
    assert round(workload.rate_for_store_mbit(1024, 2.32, 0.85), 2) == 2.65


@pytest.mark.parametrize("bad", [0, 1000, 4095, 32 << 20, True])
def test_bad_block_size(bad):
    with pytest.raises(volume.VolumeError, match="power of two"):
        volume.check_block_size(bad)


# token bucket -------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_bucket_rate_exact_over_time():
    c = FakeClock()
    b = TokenBucket(8e6, burst_bytes=10000, clock=c, sleep=c.sleep)  # 1 MB/s
    for _ in range(1000):
        b.consume(16384)
    # 16.384 MB at 1 MB/s, less the initial burst
    assert c.t == pytest.approx((16384 * 1000 - 10000) / 1e6, rel=1e-9)


def test_bucket_burst_free_then_waits():
    c = FakeClock()
    b = TokenBucket(8e6, burst_bytes=5000, clock=c, sleep=c.sleep)
    b.consume(5000)
    assert c.t == 0
    b.consume(1000)
    assert c.t == pytest.approx(0.001)


def test_bucket_rejects_bad_rate():
    with pytest.raises(ValueError):
        TokenBucket(0)


# receiver over loopback ---------------------------------------------------------------------

@pytest.fixture
def recv(tmp_path):
    srv = daemon.Receiver(str(tmp_path / "mirror" / "vol.img"), "127.0.0.1", 0,
                          idle_timeout=2.0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def port(srv):
    return srv.server_address[1]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_sync_sends_only_changed_blocks(tmp_path, recv):
    src = str(tmp_path / "vol.img")
    workload.make_volume(src, 64 * BS, seed=1)
    first = daemon.sync(src, "127.0.0.1", port(recv), BS)
    assert first["blocks_sent"] == 64
    assert sha(recv.mirror.path) == sha(src)
    changed = workload.change(src, 10, BS, locality=0.5, seed=2)
    second = daemon.sync(src, "127.0.0.1", port(recv), BS)
    assert second["blocks_sent"] == len(changed) == 6
    assert second["data_bytes"] == 6 * BS
    assert sha(recv.mirror.path) == sha(src)
    assert daemon.status("127.0.0.1", port(recv))["manifest"] == second["manifest"]


def test_directory_volume_block_vs_file_mode(tmp_path, recv_dir):
    src = str(tmp_path / "tree")
    workload.make_tree(src, 12, mean_kib=32, seed=1, block_size=BS)
    daemon.sync(src, "127.0.0.1", port(recv_dir), BS)
    workload.change_tree(src, 5, BS, locality=0.2, seed=3)
    blk = daemon.sync(src, "127.0.0.1", port(recv_dir), BS, mode="block")
    assert blk["blocks_sent"] > 0
    assert volume.volume_manifest(recv_dir.mirror.path, BS) == volume.volume_manifest(src, BS)
    changed = workload.change_tree(src, 5, BS, locality=0.2, seed=4)
    fil = daemon.sync(src, "127.0.0.1", port(recv_dir), BS, mode="file")
    whole = sum(os.path.getsize(os.path.join(src, n)) for n in changed)
    assert fil["files_sent"] == len(changed) and fil["data_bytes"] == whole
    assert whole > sum(len(b) for b in changed.values()) * BS
    assert volume.volume_manifest(recv_dir.mirror.path, BS) == volume.volume_manifest(src, BS)
    os.unlink(os.path.join(src, "d0/f00000.dat"))  # a deleted file disappears from the mirror
    daemon.sync(src, "127.0.0.1", port(recv_dir), BS)
    assert not os.path.exists(os.path.join(recv_dir.mirror.path, "d0/f00000.dat"))


@pytest.fixture
def recv_dir(tmp_path):
    srv = daemon.Receiver(str(tmp_path / "mirror" / "tree"), "127.0.0.1", 0, idle_timeout=2.0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("fault, err", [
    ({"truncate_after": 3}, "stream truncated"),
    ({"corrupt_block": 2}, "corrupted block"),
])
def test_truncated_or_corrupted_stream_leaves_mirror(tmp_path, recv, fault, err):
    src = str(tmp_path / "vol.img")
    workload.make_volume(src, 32 * BS, seed=1)
    daemon.sync(src, "127.0.0.1", port(recv), BS)
    before = sha(recv.mirror.path)
    workload.change(src, 50, BS, seed=9)
    with pytest.raises(daemon.MirrorError, match=err):
        daemon.sync(src, "127.0.0.1", port(recv), BS, **fault)
    assert sha(recv.mirror.path) == before
    assert not [n for n in os.listdir(os.path.dirname(recv.mirror.path)) if "staging" in n]
    daemon.sync(src, "127.0.0.1", port(recv), BS)  # the next sync completes
    assert sha(recv.mirror.path) == sha(src)


def test_wrong_volume_size_refused(tmp_path, recv):
    src = str(tmp_path / "vol.img")
    workload.make_volume(src, 16 * BS, seed=1)
    daemon.sync(src, "127.0.0.1", port(recv), BS)
    before = sha(recv.mirror.path)
    with open(src, "ab") as f:
        f.write(b"x" * BS)
    with pytest.raises(daemon.MirrorError, match="wrong volume size"):
        daemon.sync(src, "127.0.0.1", port(recv), BS)
    assert sha(recv.mirror.path) == before


def test_concurrent_sync_refused(tmp_path, recv):
    src = str(tmp_path / "vol.img")
    workload.make_volume(src, 16 * BS, seed=1)
    daemon.sync(src, "127.0.0.1", port(recv), BS)
    before = sha(recv.mirror.path)
    # a first session that began and then stalls (holds the lock)
    s = socket.create_connection(("127.0.0.1", port(recv)))
    wire.send(s, Message(wire.BEGIN, (0, BS, 1), [("", 16 * BS)]))
    wire.expect(wire.recv(s), wire.HASHES)
    workload.change(src, 50, BS, seed=4)
    with pytest.raises(daemon.MirrorError, match="busy"):
        daemon.sync(src, "127.0.0.1", port(recv), BS)
    assert sha(recv.mirror.path) == before
    s.close()  # the stalled session ends: the lock is released
    wait_until(lambda: recv.mirror.state == daemon.IDLE, 2, "the stalled session to end")
    daemon.sync(src, "127.0.0.1", port(recv), BS)
    assert sha(recv.mirror.path) == sha(src)


def test_sender_side_lock_refuses_second_sync(tmp_path):
    import fcntl

    src = str(tmp_path / "vol.img")
    workload.make_volume(src, 4 * BS)
    fd = os.open(src + ".sync.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(daemon.MirrorError, match="already running"):
            daemon.sync(src, "127.0.0.1", 9, BS)
    finally:
        os.close(fd)


def test_promote_makes_writable_and_refuses_syncs(tmp_path, recv):
    src = str(tmp_path / "vol.img")
    workload.make_volume(src, 8 * BS, seed=1)
    daemon.sync(src, "127.0.0.1", port(recv), BS)
    assert not os.stat(recv.mirror.path).st_mode & 0o200
    man = daemon.promote("127.0.0.1", port(recv))
    assert man == volume.volume_manifest(recv.mirror.path, BS)
    assert os.stat(recv.mirror.path).st_mode & 0o200
    with pytest.raises(daemon.MirrorError, match="promoted"):
        daemon.sync(src, "127.0.0.1", port(recv), BS)


def test_heartbeat_alerts_and_cli_skips(tmp_path, capsys):
    from testbed.mirror.__main__ import main

    alerts = []
    assert daemon.heartbeat("127.0.0.1", 9, timeout=0.5, alert=alerts.append) is None
    assert alerts and "ALERT" in alerts[0]
    src = str(tmp_path / "vol.img")
    workload.make_volume(src, 4 * BS)
    assert main(["sync", "--volume", src, "--peer", "127.0.0.1", "--port", "9"]) == 3
    assert main(["sync", "--volume", src, "--peer", "127.0.0.1", "--port", "9",
                 "--no-heartbeat", "--block-size", "1000"]) == 1
    assert "power of two" in capsys.readouterr().err


@pytest.mark.parametrize("kw", [{"wan_rate_mbit": 0}, {"wan_rate_mbit": "fast"},
                                {"lan_rate_mbit": -1}, {"wan_delay_ms": -5},
                                {"wan_rate_mbit": True}])
def test_dr_site_bad_input(kw):
    from testbed import SpecError
    from topologies import dr_site

    with pytest.raises(SpecError, match="dr_site"):
        dr_site.build(**kw)


def test_dr_site_layout():
    from topologies import dr_site

    t = dr_site.build(wan_rate_mbit=dr_site.T1_MBIT)
    links = {(ln.a, ln.b): ln for ln in t.links}
    wan = links[("dr", "sw1")]
    assert wan.a_to_b.rate_mbit == wan.b_to_a.rate_mbit == 1.544


@pytest.mark.parametrize("call", [
    lambda p: workload.change(p, 101),
    lambda p: workload.change(p, 5, locality=2),
    lambda p: workload.make_volume(p, 0),
])
def test_workload_bad_input(tmp_path, call):
    p = str(tmp_path / "v.img")
    with open(p, "wb") as f:
        f.write(b"\0" * BS)
    with pytest.raises(workload.WorkloadError):
        call(p)
    assert open(p, "rb").read() == b"\0" * BS


@pytest.mark.parametrize("argv, err", [
    ([], "mirror: the following arguments are required: cmd"),
    (["status", "--peer", "127.0.0.1", "--port", "0"], "mirror: argument --port: port must"),
    (["sync", "--volume", "v"], "mirror: the following arguments are required: --peer"),
    (["serve"], "mirror: the following arguments are required: --mirror"),
])
def test_cli_bad_arguments_one_line_exit_2(argv, err, capsys):
    from testbed.mirror.__main__ import main

    assert main(argv) == 2
    out = capsys.readouterr().err
    assert out.startswith(err) and out.count("\n") == 1


def test_serve_stops_on_sigterm_with_exit_0(tmp_path):
    import signal
    import subprocess
    import sys

    with socket.socket() as s:  # a port free a moment ago
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mirror = str(tmp_path / "vol.img")
    p = subprocess.Popen([sys.executable, "-m", "testbed.mirror", "serve", "--mirror", mirror,
                          "--host", "127.0.0.1", "--port", str(free)],
                         stderr=subprocess.PIPE, text=True)
    try:
        def answers():
            try:
                return daemon.status("127.0.0.1", free, timeout=0.5)
            except OSError:
                assert p.poll() is None, p.stderr.read()
                return None

        assert wait_until(answers, 10, "the mirror daemon")["state"] == "idle"
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert "stopped" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
