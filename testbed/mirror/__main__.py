"""python -m testbed.mirror serve|sync|status|promote ...

    serve   --mirror PATH [--port 10566] [--idle-timeout 5] [--size BYTES]
    sync    --volume PATH --peer HOST [--port] [--block-size 65536] [--mode block|file]
            [--rate-mbit R] [--timeout 5] [--no-heartbeat]    -> one JSON line of counters
    status  --peer HOST [--port]                              -> one JSON line
    promote --peer HOST [--port]                              -> the mirror's manifest

Exit codes: 0 done (serve: stopped by SIGTERM/SIGINT), 1 refused or failed (one line on
stderr, mirror untouched), 2 bad arguments (one line on stderr), 3 heartbeat failed: sync
skipped (an ALERT line on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from testbed.daemon import ArgParser, Stop, port, raise_stop_on_signals, run_main
from testbed.mirror import daemon, wire
from testbed.mirror.volume import VolumeError

NAME = "mirror"


def parse_args(argv) -> argparse.Namespace:
    ap = ArgParser(NAME, description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)  # ArgParsers too: one-line errors
    a = sub.add_parser("serve")
    a.add_argument("--mirror", required=True)
    a.add_argument("--host", default="0.0.0.0")
    a.add_argument("--port", type=port, default=wire.DEFAULT_PORT)
    a.add_argument("--idle-timeout", type=float, default=5.0)
    a.add_argument("--size", type=int, default=None, help="refuse volumes of another size")
    b = sub.add_parser("sync")
    b.add_argument("--volume", required=True)
    b.add_argument("--peer", required=True)
    b.add_argument("--port", type=port, default=wire.DEFAULT_PORT)
    b.add_argument("--block-size", type=int, default=65536)
    b.add_argument("--mode", choices=sorted(wire.MODES), default="block")
    b.add_argument("--rate-mbit", type=float, default=None)
    b.add_argument("--timeout", type=float, default=5.0)
    b.add_argument("--no-heartbeat", action="store_true")
    b.add_argument("--no-snapshot", action="store_true")
    b.add_argument("--corrupt-block", type=int, default=None, help=argparse.SUPPRESS)
    b.add_argument("--truncate-after", type=int, default=None, help=argparse.SUPPRESS)
    for name in ("status", "promote"):
        c = sub.add_parser(name)
        c.add_argument("--peer", required=True)
        c.add_argument("--port", type=port, default=wire.DEFAULT_PORT)
    return ap.parse_args(argv)


def command(argv) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s mirror %(levelname)s %(message)s")
    try:
        if args.cmd == "serve":
            return serve(args)
        if args.cmd == "sync":
            if not args.no_heartbeat and daemon.heartbeat(args.peer, args.port) is None:
                return 3
            stats = daemon.sync(args.volume, args.peer, args.port, args.block_size, args.mode,
                                args.rate_mbit, args.timeout, not args.no_snapshot,
                                args.corrupt_block, args.truncate_after)
            print(daemon.format_stats(stats), flush=True)
        elif args.cmd == "status":
            print(json.dumps(daemon.status(args.peer, args.port)), flush=True)
        elif args.cmd == "promote":
            print(daemon.promote(args.peer, args.port), flush=True)
    except (daemon.MirrorError, VolumeError, wire.WireError, OSError) as e:
        print(f"mirror {args.cmd}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def serve(args: argparse.Namespace) -> int:
    """The DR site's daemon, until SIGTERM/SIGINT (exit 0). A sync cut short by the signal
    leaves only staging, which the next start removes: the mirror is never half-written."""
    raise_stop_on_signals()
    srv = None
    try:
        srv = daemon.Receiver(args.mirror, args.host, args.port, args.idle_timeout, args.size)
        logging.info("serving mirror %s on %s:%d", args.mirror, args.host, args.port)
        srv.serve_forever()
    except Stop:
        logging.info("stopped")
    finally:
        if srv is not None:
            srv.server_close()
    return 0


def main(argv=None) -> int:
    return run_main(NAME, command, argv)


if __name__ == "__main__":
    sys.exit(main())
