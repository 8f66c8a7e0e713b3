"""run_main(): the shape of every daemon's main()."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from testbed.daemon.args import UsageError
from testbed.daemon.loop import Stop


def run_main(name: str, body: Callable[[Sequence[str]], int], argv=None) -> int:
    """Run body(argv) and return its exit status. A UsageError, or a SystemExit with a
    message, becomes one line on stderr, `NAME: message`, and exit 2; Stop (a stop signal
    under raise_stop_on_signals) ends it with 0. Anything else is
    the body's to handle (an OSError while setting up: one line and exit 1); what escapes
    is a bug, and its traceback is kept."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        return int(body(args) or 0)
    except Stop:  # a stop signal (raise_stop_on_signals) is a clean end
        return 0
    except UsageError as e:
        print(f"{name}: {e}", file=sys.stderr, flush=True)
        return 2
    except SystemExit as e:
        if isinstance(e.code, str):
            msg = e.code if e.code.startswith(f"{name}:") else f"{name}: {e.code}"
            print(msg, file=sys.stderr, flush=True)
            return 2
        return int(e.code or 0)
