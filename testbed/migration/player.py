"""A video player for the migratable streamer: plays out with a buffer, logs stalls, hashes.

    python -m testbed.migration.player --dst IP --port P --out JSON [--rate-mbit 2]
        [--buffer-s 30] [--rebuffer-s 1]

Content arrives as a byte stream at rate-mbit of "video". Playback starts once buffer-s
seconds are buffered, then consumes rate-mbit in real time; when the buffer runs dry the
player stalls (logged with start and end) until rebuffer-s seconds are buffered again. The
JSON report: bytes, sha256 of everything received, local/peer addresses, reset, stalls,
min_buffer_s (the lowest buffer level while playing) and a 100 ms timeline of bytes
received and buffer level. TERM or INT end it at once, without a report.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import time

from testbed import daemon

NAME = "migration.player"
BIN_S = 0.1


def body(argv) -> int:
    ap = daemon.ArgParser(NAME, description="Play the migratable streamer's stream.")
    ap.add_argument("--dst", required=True, type=daemon.ipv4)
    ap.add_argument("--port", type=daemon.port, required=True)
    ap.add_argument("--out", required=True, help="the JSON report, written at the end")
    ap.add_argument("--rate-mbit", type=float, default=2.0)
    ap.add_argument("--buffer-s", type=float, default=30.0)
    ap.add_argument("--rebuffer-s", type=float, default=1.0)
    a = ap.parse_args(argv)
    if a.rate_mbit <= 0 or a.buffer_s <= 0 or a.rebuffer_s <= 0:
        ap.error("--rate-mbit, --buffer-s and --rebuffer-s must be positive")
    daemon.raise_stop_on_signals()  # Stop: run_main returns 0
    return play(a)


def play(a) -> int:
    rate = a.rate_mbit * 1e6 / 8
    try:
        s = socket.create_connection((a.dst, a.port), timeout=10)
    except OSError as e:
        print(f"{NAME}: cannot connect to {a.dst}:{a.port}: {e}", file=sys.stderr, flush=True)
        return 1
    s.settimeout(0.1)
    local = "%s:%d" % s.getsockname()
    peer = "%s:%d" % s.getpeername()
    print(f"player connected from {local} to {peer}", flush=True)
    h, total, reset = hashlib.sha256(), 0, False
    t_start = time.time()
    playing, played_s, last = False, 0.0, time.time()
    stalls, min_buffer = [], None
    stall_start = None
    timeline, bin_bytes, next_bin = [], 0, t_start + BIN_S

    def advance(now: float) -> None:
        nonlocal playing, played_s, last, stall_start, min_buffer
        if playing:
            played_s += now - last
        buffered = total / rate - played_s
        if playing and buffered <= 0:  # ran dry at the moment the buffer hit zero
            played_s = total / rate
            playing = False
            stall_start = now + buffered
            print(f"stall at {stall_start:.3f}", flush=True)
            buffered = 0.0
        elif playing:
            min_buffer = buffered if min_buffer is None else min(min_buffer, buffered)
        if not playing and buffered >= (a.buffer_s if stall_start is None and not stalls
                                        else a.rebuffer_s):
            playing = True
            if stall_start is not None:
                stalls.append({"start": stall_start, "end": now,
                               "duration_s": round(now - stall_start, 3)})
                print(f"stall ended after {now - stall_start:.3f} s", flush=True)
                stall_start = None
        last = now

    while True:
        try:
            data = s.recv(1 << 16)
        except socket.timeout:
            data = None
        except ConnectionResetError:
            reset = True
            break
        now = time.time()
        while now >= next_bin:
            advance(next_bin)
            timeline.append([round(next_bin, 3), bin_bytes, round(total / rate - played_s, 3)])
            bin_bytes, next_bin = 0, next_bin + BIN_S
        if data is None:
            continue
        if not data:
            break
        h.update(data)
        total += len(data)
        bin_bytes += len(data)
        advance(now)
    t_end = time.time()
    s.close()
    daemon.write_json_atomic(a.out, {
        "bytes": total, "sha256": h.hexdigest(), "local": local, "peer": peer,
        "reset": reset, "t_start": t_start, "t_end": t_end, "stalls": stalls,
        "stall_open": stall_start, "min_buffer_s": min_buffer,
        "started_playing": bool(played_s > 0 or playing), "timeline": timeline})
    return 0


def main(argv=None) -> int:
    return daemon.run_main(NAME, body, argv)


if __name__ == "__main__":
    sys.exit(main())
