"""The runtime every daemon of the testbed uses, so none re-implements it.

- args: ArgParser (one-line errors, exit 2) and argument types (port, ipv4, addr, ranges);
- files: ready and status files written whole by a rename; `ready_file()` removes it at exit;
- keys: shared HMAC keys, always hex in a 0600 file;
- loop: Stop, signal handling with a wake-up fd, Timers and a selector Loop;
- io: recv_exact over a stream socket; Stream, a non-blocking connection on a Loop;
- main: run_main(), which turns usage errors into one line and exit 2.

Light on imports (the standard library only): daemons start as `python -m ...`.
"""

from testbed.daemon.args import ArgParser, UsageError, addr, float_in, int_in, ipv4, port
from testbed.daemon.files import (ready_file, remove_quietly, write_atomic,
                                  write_json_atomic)
from testbed.daemon.io import PeerClosed, Stream, recv_exact
from testbed.daemon.keys import new_key, read_key, write_key
from testbed.daemon.loop import Loop, Stop, Timers, on_signals, raise_stop_on_signals
from testbed.daemon.main import run_main

__all__ = ["ArgParser", "UsageError", "addr", "float_in", "int_in", "ipv4", "port",
           "ready_file", "remove_quietly", "write_atomic", "write_json_atomic",
           "PeerClosed", "Stream", "recv_exact", "new_key", "read_key", "write_key",
           "Loop", "Stop", "Timers", "on_signals", "raise_stop_on_signals", "run_main"]
