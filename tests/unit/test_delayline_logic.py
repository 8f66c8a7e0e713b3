"""Pure logic of the NFQUEUE delay line (testbed.delayline): scheduling, loss, validation,
netlink message encoding, control handling and the control client. No root, no kernel."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import threading

import pytest

from testbed import delayline
from testbed.kernel.delayline import control
from testbed.delayline import (
    DelayLine,
    LineParams,
    Pacer,
    Scheduler,
    parse_args,
    queue_flags_message,
    verdict_batch_message,
)

MS = 1_000_000  # ns


# parameters -----------------------------------------------------------------------------------


def test_params_defaults_and_types():
    p = LineParams(10)
    assert p.to_dict() == {"delay_ms": 10.0, "jitter_ms": 0.0, "loss_pct": 0.0}
    assert isinstance(p.delay_ms, float)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"delay_ms": -1}, "delay_ms must be >= 0"),
        ({"delay_ms": 5, "jitter_ms": -0.1}, "jitter_ms must be >= 0"),
        ({"delay_ms": 5, "loss_pct": -1}, "loss_pct must be >= 0"),
        ({"delay_ms": 5, "loss_pct": 100.5}, "loss_pct must be <= 100"),
        ({"delay_ms": 5, "jitter_ms": 6}, "jitter_ms (6) must be <= delay_ms (5)"),
        ({"delay_ms": math.nan}, "delay_ms must be finite"),
        ({"delay_ms": math.inf}, "delay_ms must be finite"),
        ({"delay_ms": "10"}, "delay_ms must be a number"),
        ({"delay_ms": True}, "delay_ms must be a number"),
        ({"delay_ms": None}, "delay_ms must be a number"),
    ],
)
def test_params_invalid(kwargs, words):
    with pytest.raises(ValueError) as e:
        LineParams(**kwargs)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_params_edges_are_valid():
    LineParams(0)
    LineParams(5, jitter_ms=5, loss_pct=100)
    LineParams(0, loss_pct=0)


def test_params_updated_partial_and_validated_against_merge():
    p = LineParams(10, 2, 1)
    q = p.updated({"loss_pct": 5})
    assert q.to_dict() == {"delay_ms": 10.0, "jitter_ms": 2.0, "loss_pct": 5.0}
    assert p.loss_pct == 1.0  # frozen, unchanged
    with pytest.raises(ValueError, match="jitter_ms"):
        p.updated({"delay_ms": 1})  # jitter 2 > new delay 1
    with pytest.raises(ValueError, match="unknown parameter"):
        p.updated({"rate_mbit": 3})
    with pytest.raises(ValueError, match="needs an object"):
        p.updated([1, 2])


# scheduler ------------------------------------------------------------------------------------


def test_fixed_delay_is_exact():
    s = Scheduler(LineParams(20))
    for t in (0, 1, 5 * MS, 7 * MS + 3):
        assert s.arrive(t) == t + 20 * MS


def test_delay_zero_releases_at_arrival():
    s = Scheduler(LineParams(0))
    assert s.arrive(123) == 123


def test_jitter_never_reorders_and_bounds_hold():
    delay, jitter = 10.0, 8.0
    s = Scheduler(LineParams(delay, jitter), seed=7)
    now, prev = 0, -1
    clamped = 0
    for _ in range(20000):
        now += 50_000  # 50 us apart: far closer than the jitter, so clamping is exercised
        r = s.arrive(now)
        assert r is not None
        assert r >= prev, "reordered"
        # never earlier than arrival + delay - jitter; later only by clamping to the previous
        assert r >= now + (delay - jitter) * MS - 1
        if r > now + (delay + jitter) * MS + 1:
            assert r == prev
        clamped += r == prev
        prev = r
    assert clamped > 0


def test_jitter_samples_uniform_in_range_when_sparse():
    delay, jitter = 10.0, 4.0
    s = Scheduler(LineParams(delay, jitter), seed=3)
    offsets = []
    now = 0
    for _ in range(20000):
        now += 100 * MS  # far apart: no clamping, the sample shows through
        offsets.append((s.arrive(now) - now - delay * MS) / MS)
    assert min(offsets) >= -jitter and max(offsets) <= jitter
    mean = sum(offsets) / len(offsets)
    # uniform(-4, 4): sd 4/sqrt(3) ~ 2.31, sd of the mean over 20000 ~ 0.016
    assert abs(mean) < 0.08
    assert min(offsets) < -3.9 and max(offsets) > 3.9


def test_loss_rate_within_binomial_tolerance():
    n, pct = 100_000, 5.0
    s = Scheduler(LineParams(10, loss_pct=pct), seed=1)
    lost = sum(s.arrive(i * 10_000) is None for i in range(n))
    p = pct / 100
    sd = math.sqrt(n * p * (1 - p))  # ~ 69
    assert abs(lost - n * p) < 4 * sd


def test_loss_is_reproducible_with_seed():
    def pattern(seed):
        s = Scheduler(LineParams(10, 3, 10), seed=seed)
        return [s.arrive(i * MS) for i in range(2000)]

    assert pattern(42) == pattern(42)
    assert pattern(42) != pattern(43)


def test_loss_extremes():
    s = Scheduler(LineParams(1, loss_pct=0), seed=1)
    assert all(s.arrive(i) is not None for i in range(5000))
    s = Scheduler(LineParams(1, loss_pct=100), seed=1)
    assert all(s.arrive(i) is None for i in range(5000))


def test_lost_packets_do_not_move_release_clock():
    s = Scheduler(LineParams(10, loss_pct=50), seed=5)
    prev = 0
    for i in range(1000):
        r = s.arrive(i * MS)
        if r is not None:
            assert r == i * MS + 10 * MS and r >= prev
            prev = r


def test_set_params_applies_to_later_arrivals_without_reordering():
    s = Scheduler(LineParams(50))
    first = s.arrive(0)
    assert first == 50 * MS
    s.set_params(LineParams(10))
    # arrives 1 ms later with a 10 ms delay: would overtake, so it waits for the first one
    assert s.arrive(1 * MS) == first
    assert s.arrive(100 * MS) == 110 * MS


# pacer ----------------------------------------------------------------------------------------


def test_pacer_sleeps_less_than_asked_by_its_lead():
    p = Pacer(lead_ns=100_000)
    assert p.sleep_ns(0, 10 * MS) == 10 * MS - 100_000


def test_pacer_spins_within_budget_then_goes_early():
    p = Pacer(lead_ns=100_000, spin_share=0.0, max_tokens_ns=150_000)
    assert p.sleep_ns(0, 80_000) == 0  # spin 80 us: budget 150 -> 70
    assert p.sleep_ns(0, 80_000) == -1  # 70 left < 80: release early instead
    p = Pacer(lead_ns=100_000, spin_share=0.5, max_tokens_ns=150_000)
    p.sleep_ns(0, 150_000)  # spends all
    assert p.sleep_ns(200_000, 250_000) == 0  # 100 us refilled, 50 needed


def test_pacer_lead_tracks_lateness():
    p = Pacer(lead_ns=0, max_lead_ns=500_000)
    for _ in range(100):
        p.woke(120_000)
    assert 110_000 < p.lead_ns <= 120_000
    for _ in range(100):
        p.woke(10 * MS)  # clamped: a preempted vCPU must not make us spin for ms
    assert p.lead_ns <= 500_000
    for _ in range(200):
        p.woke(-5)
    assert p.lead_ns < 1000


# netlink encoding (golden bytes) -------------------------------------------------------------


def test_verdict_batch_message_golden():
    msg = verdict_batch_message(queue=7, last_id=0x01020304)
    nl_len, nl_type, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert nl_len == len(msg) == 16 + 4 + 12
    assert nl_type == (3 << 8) | 3  # NFNL_SUBSYS_QUEUE, NFQNL_MSG_VERDICT_BATCH
    assert flags == 1 and seq == 0 and pid == 0  # NLM_F_REQUEST, no ACK
    assert msg[16:20] == bytes([0, 0, 0, 7])  # nfgenmsg: AF_UNSPEC, v0, res_id=queue (BE)
    assert msg[20:24] == struct.pack("=HH", 12, 2)  # NFQA_VERDICT_HDR
    assert msg[24:] == bytes([0, 0, 0, 1, 1, 2, 3, 4])  # NF_ACCEPT, id (BE)


def test_verdict_batch_id_wraps_to_u32():
    assert verdict_batch_message(1, 2**32 + 5)[-4:] == struct.pack("!I", 5)


def test_queue_flags_message_golden():
    msg = queue_flags_message(queue=258, mask=4, flags=4)
    nl_len, nl_type, _flags, _, _ = struct.unpack_from("=IHHII", msg)
    assert nl_len == len(msg) == 16 + 4 + 8 + 8
    assert nl_type == (3 << 8) | 2  # NFQNL_MSG_CONFIG
    assert msg[16:20] == bytes([0, 0, 1, 2])
    assert msg[20:28] == struct.pack("=HH", 8, 4) + struct.pack("!I", 4)  # NFQA_CFG_MASK
    assert msg[28:36] == struct.pack("=HH", 8, 5) + struct.pack("!I", 4)  # NFQA_CFG_FLAGS


def test_kernel_queue_counters_parses_proc(tmp_path):
    f = tmp_path / "nfnetlink_queue"
    f.write_text(
        "    1  12345     3 1  65531     7     9      123  1\n"
        "    2  12346     0 1  65531     0     0       10  1\n"
    )
    assert delayline.kernel_queue_counters(1, str(f)) == {
        "kernel_held": 3,
        "kernel_queue_dropped": 7,
        "kernel_user_dropped": 9,
    }
    assert delayline.kernel_queue_counters(5, str(f)) == {}
    assert delayline.kernel_queue_counters(1, str(tmp_path / "missing")) == {}


# control handling (no queue bound) ------------------------------------------------------------


@pytest.fixture
def line(tmp_path):
    return DelayLine(3, Scheduler(LineParams(10, 1, 0), seed=1), str(tmp_path / "c"), 1000)


def handle(line, msg):
    raw = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
    reply = line.handle_control(raw)
    json.dumps(reply)  # always serialisable
    return reply


def test_control_set_applies_and_replies_params(line):
    reply = handle(line, {"set": {"delay_ms": 20, "loss_pct": 2.5}})
    assert reply == {"ok": True, "params": {"delay_ms": 20.0, "jitter_ms": 1.0, "loss_pct": 2.5}}
    assert line.sched.params.delay_ms == 20.0


@pytest.mark.parametrize(
    "msg",
    [
        {"set": {"delay_ms": -5}},
        {"set": {"loss_pct": 101}},
        {"set": {"jitter_ms": 50}},
        {"set": {"delay_ms": "fast"}},
        {"set": {"bogus": 1}},
        {"set": 3},
        {"hello": 1},
        [1, 2],
        b"not json{",
        b"\xff\xfe",
    ],
)
def test_control_bad_messages_change_nothing(line, msg):
    before = line.sched.params
    reply = handle(line, msg)
    assert reply["ok"] is False
    assert isinstance(reply["error"], str) and reply["error"] and "\n" not in reply["error"]
    assert line.sched.params == before


def test_control_stats(line):
    line.received, line.dropped_loss, line.released = 10, 2, 7
    line.held.append((0, 1))
    reply = handle(line, {"stats": True})
    assert reply["ok"] is True
    assert (reply["received"], reply["dropped_loss"], reply["released"], reply["held"]) == (
        10,
        2,
        7,
        1,
    )
    assert reply["params"] == {"delay_ms": 10.0, "jitter_ms": 1.0, "loss_pct": 0.0}


# argv -----------------------------------------------------------------------------------------

BASE = ["--queue", "1", "--control", "/tmp/x.sock"]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--delay-ms", "-1"], "delay_ms must be >= 0"),
        (["--delay-ms", "5", "--loss-pct", "100.1"], "loss_pct must be <= 100"),
        (["--delay-ms", "5", "--jitter-ms", "6"], "jitter_ms (6) must be <= delay_ms (5)"),
        (["--delay-ms", "x"], "invalid float value"),
        (["--delay-ms", "5", "--max-held", "0"], "--max-held"),
        (["--delay-ms", "5", "--queue", "70000"], "--queue"),
    ],
)
def test_bad_argv_exits_2_with_one_line(capsys, extra, words):
    with pytest.raises(SystemExit) as e:
        parse_args(BASE + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_good_argv():
    a = parse_args(
        BASE + ["--delay-ms", "20", "--jitter-ms", "2", "--loss-pct", "1", "--seed", "4"]
    )
    assert a.params == LineParams(20, 2, 1) and a.seed == 4
    assert a.max_held == delayline.DEFAULT_MAX_HELD


# control client (testbed.kernel.delayline.control, over testbed.daemon.control) -------------


def test_control_client_round_trip_and_cleanup(tmp_path):
    path = str(tmp_path / "daemon.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    seen = {}

    def serve():
        data, addr = server.recvfrom(65536)
        seen["msg"], seen["addr"] = json.loads(data), addr
        server.sendto(json.dumps({"ok": True, "echo": seen["msg"]}).encode(), addr)

    t = threading.Thread(target=serve)
    t.start()
    try:
        reply = control(path, {"stats": True})
    finally:
        t.join(5)
        server.close()
    assert reply == {"ok": True, "echo": {"stats": True}}
    assert os.path.dirname(seen["addr"]) == str(tmp_path)
    assert os.listdir(tmp_path) == ["daemon.sock"]  # temporary client socket removed


def test_control_client_timeout_cleans_up(tmp_path):
    path = str(tmp_path / "mute.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    try:
        with pytest.raises(TimeoutError):
            control(path, {"stats": True}, timeout=0.1)
    finally:
        server.close()
    assert os.listdir(tmp_path) == ["mute.sock"]


def test_control_client_missing_daemon(tmp_path):
    with pytest.raises(OSError):
        control(str(tmp_path / "nobody.sock"), {"stats": True}, timeout=0.1)
    assert os.listdir(tmp_path) == []
