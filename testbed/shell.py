"""Interactive shell on a running Network, Mininet style: `testbed cli topologies/demo.py`.

    testbed> h1 ping -c3 h2          run a command inside h1 (node names become addresses)
    testbed> link h1 s1 delay 20ms   change a link at runtime
    testbed> pingall / iperf h1 h2 / nodes / links / net / help / exit

The parsing of every command is done by pure functions (split_line, substitute_nodes,
parse_link_command, parse_iperf_args, parse_params, ...) that need neither root nor a
network; the Shell class only applies their results to a Network.

When stdin is not a terminal, commands are read from it line by line (each one echoed after
the prompt) and the exit status is 1 if any command failed.
"""

from __future__ import annotations

import cmd
import codecs
import importlib.util
import inspect
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Callable

from testbed.errors import CommandError, SpecError, TestbedError
from testbed.spec import Shaping, parse_delay_ms, parse_loss_pct, parse_rate_mbit

HISTORY_FILE = os.path.expanduser("~/.testbed_history")
IPERF_PORT = 5201
DEFAULT_IPERF_S = 5.0
MAX_IPERF_S = 3600.0

# --------------------------------------------------------------------------------------------
# pure parsing
# --------------------------------------------------------------------------------------------

DIRECTIONS = ("both", "a_to_b", "b_to_a")
_FLIP = {"both": "both", "a_to_b": "b_to_a", "b_to_a": "a_to_b"}

# shell parameter name -> Link.set() keyword
LINK_PARAMS = {
    "rate": "rate_mbit", "bw": "rate_mbit", "rate_mbit": "rate_mbit",
    "delay": "delay_ms", "delay_ms": "delay_ms",
    "jitter": "jitter_ms", "jitter_ms": "jitter_ms",
    "loss": "loss_pct", "loss_pct": "loss_pct",
    "queue": "queue_pkts", "queue_pkts": "queue_pkts", "limit": "queue_pkts",
}
_OFF = ("none", "off", "default", "unlimited")

LINK_USAGE = ("link <a> <b> [a_to_b|b_to_a|both] <param> <value> ...  |  link <a> <b> up|down"
              "   (params: rate, delay, jitter, loss, queue)")


def split_line(line: str) -> list:
    """Split a command line like a POSIX shell would (quotes, backslashes); SpecError if it
    cannot be split (an unclosed quote)."""
    try:
        return shlex.split(line, comments=False, posix=True)
    except ValueError as e:
        raise SpecError(f"cannot parse {line.strip()!r}: {e}") from None


def substitute_nodes(argv: Sequence[str], names: Iterable[str],
                     resolver: Callable[[str], str | None]) -> list:
    """argv with every argument (not argv[0], the program) equal to a node name replaced by
    resolver(name), as Mininet does (`h1 ping h2`). A resolver that returns None or raises
    TestbedError (a switch has no address) leaves the token as it is."""
    names = set(names)
    out = list(argv[:1])
    for tok in argv[1:]:
        if tok in names:
            try:
                repl = resolver(tok)
            except TestbedError:
                repl = None
            out.append(tok if repl is None else str(repl))
        else:
            out.append(tok)
    return out


def parse_link_value(param: str, value: str):
    """One link parameter's value from the shell -> what Link.set() takes for it.

    rate: Mbit/s or with a unit ('10mbit', '1gbit'); delay/jitter: ms or with a unit ('10ms',
    '1s'); loss: percent ('1', '1%'); queue: packets. 'off'/'none' removes a rate or a queue
    limit and sets delay/jitter/loss to 0."""
    key = LINK_PARAMS.get(param.lower())
    if key is None:
        raise SpecError(f"unknown link parameter {param!r} (use rate, delay, jitter, loss, queue)")
    off = value.strip().lower() in _OFF
    if key == "rate_mbit":
        return None if off else parse_rate_mbit(value, "rate")
    if key in ("delay_ms", "jitter_ms"):
        return 0.0 if off else parse_delay_ms(value, param)
    if key == "loss_pct":
        return 0.0 if off else parse_loss_pct(value, "loss")
    # queue_pkts
    if off:
        return None
    v = value.strip().lower()
    for suffix in ("packets", "pkts", "p"):
        if v.endswith(suffix):
            v = v[: -len(suffix)]
            break
    try:
        n = int(v)
    except ValueError:
        raise SpecError(f"queue: expected a whole number of packets, got {value!r}") from None
    if n < 1:
        raise SpecError(f"queue: must be at least 1 packet, got {value!r}")
    return n


def parse_link_command(tokens: Sequence[str]) -> tuple:
    """The arguments of `link` -> (a, b, direction, params, up).

    direction is 'both', 'a_to_b' or 'b_to_a', relative to a and b as typed; params maps
    Link.set() keywords (rate_mbit, delay_ms, jitter_ms, loss_pct, queue_pkts) to validated
    values; up is True, False or None (unchanged). `param=value` works as well as
    `param value`. With only the two names, params is {} and up None (show the link)."""
    toks = []
    for t in tokens:  # 'delay=10ms' -> 'delay', '10ms'
        if "=" in t and not t.startswith("="):
            k, v = t.split("=", 1)
            toks += [k, v]
        else:
            toks.append(t)
    if len(toks) < 2:
        raise SpecError(f"usage: {LINK_USAGE}")
    a, b = toks[0], toks[1]
    if a == b:
        raise SpecError(f"link {a} {b}: a link joins two different nodes")
    rest = toks[2:]
    direction = "both"
    if rest and rest[0].lower() in DIRECTIONS:
        direction = rest.pop(0).lower()
    params: dict = {}
    up = None
    i = 0
    while i < len(rest):
        word = rest[i].lower()
        if word in ("up", "down"):
            if up is not None:
                raise SpecError(f"link {a} {b}: say up or down once")
            up = word == "up"
            i += 1
            continue
        if word in DIRECTIONS:
            raise SpecError(f"link {a} {b}: the direction ({word}) goes right after the names")
        if word not in LINK_PARAMS:
            raise SpecError(f"link {a} {b}: unknown parameter {rest[i]!r} "
                            f"(use rate, delay, jitter, loss, queue, up, down)")
        if i + 1 >= len(rest):
            raise SpecError(f"link {a} {b}: {rest[i]} needs a value")
        key = LINK_PARAMS[word]
        if key in params:
            raise SpecError(f"link {a} {b}: {key.split('_')[0]} given twice")
        params[key] = parse_link_value(word, rest[i + 1])
        i += 2
    if up is not None and not params and direction != "both":
        raise SpecError(f"link {a} {b}: up/down acts on both directions; drop {direction}")
    return a, b, direction, params, up


def orient(direction: str, a: str, spec_a: str) -> str:
    """A direction typed relative to `a` -> the same direction relative to the link's own
    first node spec_a (`link s1 h1 a_to_b` on the link h1-s1 means its b_to_a)."""
    if direction not in _FLIP:
        raise SpecError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    return direction if a == spec_a else _FLIP[direction]


def parse_iperf_args(tokens: Sequence[str]) -> tuple:
    """The arguments of `iperf` -> (client, server, seconds)."""
    if len(tokens) not in (2, 3):
        raise SpecError("usage: iperf <client> <server> [seconds]")
    a, b = tokens[0], tokens[1]
    if a == b:
        raise SpecError("iperf: client and server must be different nodes")
    secs = DEFAULT_IPERF_S
    if len(tokens) == 3:
        try:
            secs = float(tokens[2].rstrip("s"))
        except ValueError:
            raise SpecError(f"iperf: seconds must be a number, got {tokens[2]!r}") from None
        if not 0 < secs <= MAX_IPERF_S:
            raise SpecError(f"iperf: seconds must be in (0, {MAX_IPERF_S:g}], got {tokens[2]!r}")
    return a, b, secs


def parse_iperf_json(text: str) -> dict:
    """iperf3 -J client output -> {'sent_bps', 'received_bps', 'seconds', 'retransmits'}."""
    try:
        data = json.loads(text)
    except ValueError:
        tail = text.strip().splitlines()[-1:] or ["(no output)"]
        raise TestbedError(f"iperf3 gave no JSON: {tail[0]}") from None
    if data.get("error"):
        raise TestbedError(f"iperf3: {data['error']}")
    end = data.get("end") or {}
    sent, recv = end.get("sum_sent") or {}, end.get("sum_received") or {}
    if "bits_per_second" not in recv:
        raise TestbedError("iperf3 output has no receiver summary")
    return {"sent_bps": float(sent.get("bits_per_second", 0.0)),
            "received_bps": float(recv["bits_per_second"]),
            "seconds": float(recv.get("seconds", 0.0)),
            "retransmits": sent.get("retransmits")}


def coerce_value(text):
    """'3' -> 3, '2.5' -> 2.5, 'true'/'false' -> True/False, anything else stays a string."""
    if not isinstance(text, str):
        return text
    low = text.strip().lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    for conv in (int, float):
        try:
            return conv(text.strip())
        except ValueError:
            pass
    return text


parse_value = coerce_value  # the name testbed/cli.py looks for


def parse_params(items) -> dict:
    """['hosts=4', 'delay_ms=2.5'] (or a dict of strings) -> {'hosts': 4, 'delay_ms': 2.5}."""
    if items is None:
        return {}
    if isinstance(items, dict):
        return {str(k): coerce_value(v) for k, v in items.items()}
    out = {}
    for item in items:
        if "=" not in item:
            raise SpecError(f"parameter {item!r}: expected key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k.isidentifier():
            raise SpecError(f"parameter {item!r}: {k!r} is not a valid name")
        out[k] = coerce_value(v)
    return out


def _num(x: float) -> str:
    return f"{x:.6g}"


def format_rate(mbit: float | None) -> str:
    if mbit is None:
        return "unlimited"
    if mbit >= 1000:
        return f"{_num(mbit / 1000)} Gbit/s"
    if mbit < 1:
        return f"{_num(mbit * 1000)} kbit/s"
    return f"{_num(mbit)} Mbit/s"


def format_shaping(s: Shaping) -> str:
    """One direction's shaping as a short phrase."""
    if s.is_plain:
        return "unshaped"
    parts = [f"rate {format_rate(s.rate_mbit)}"] if s.rate_mbit is not None else []
    if s.delay_ms or s.jitter_ms:
        parts.append(f"delay {_num(s.delay_ms)} ms" + (f" ± {_num(s.jitter_ms)} ms"
                                                       if s.jitter_ms else ""))
    if s.loss_pct:
        parts.append(f"loss {_num(s.loss_pct)}%")
    if s.queue_pkts is not None:
        parts.append(f"queue {s.queue_pkts} pkts")
    return ", ".join(parts)


def format_pingall(hosts: Sequence[str], results: dict) -> list:
    """Mininet's pingall report. results[(src, dst)] is True if the ping got its reply."""
    lines = []
    for src in hosts:
        row = [dst if results.get((src, dst)) else "X" for dst in hosts if dst != src]
        lines.append(f"{src} -> {' '.join(row)}")
    total = len(results)
    got = sum(1 for ok in results.values() if ok)
    dropped = 0 if total == 0 else round(100.0 * (total - got) / total)
    lines.append(f"*** Results: {dropped}% dropped ({got}/{total} received)")
    return lines


def format_bps(bps: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.0f} bit/s"


# --------------------------------------------------------------------------------------------
# the shell
# --------------------------------------------------------------------------------------------

_HELP = """\
commands:
  <node> <command ...>      run a command in a node; other node names become their
                            addresses (h1 ping -c3 h2). No shell: use sh -c '...' for pipes
  exec <node> <command ...> the same, for a node whose name is also a shell command
  nodes                     list the nodes
  links                     list the links, each direction's shaping, backend, up/down
  net, dump                 nodes with their kind, interfaces, addresses and peers
  link <a> <b> [a_to_b|b_to_a|both] <param> <value> ...
                            change a link: rate (Mbit/s or 10mbit), delay (ms or 10ms),
                            jitter, loss (%), queue (packets); 'off' removes one
  link <a> <b> up|down      bring a link up or down; `link <a> <b>` shows it
  pingall                   every host pings every other host once
  iperf <a> <b> [seconds]   iperf3 from a (client) to b (server); prints the bitrate
  help [command]            this text, or one command's
  exit, quit, Ctrl-D        tear the network down and leave
"""


class Shell(cmd.Cmd):
    """The command interpreter. Interactive when reading a terminal; otherwise each line of
    stdin is one command, echoed after the prompt."""

    prompt = "testbed> "
    doc_header = "commands (help <command> for details):"

    def __init__(self, net, stdin=None, stdout=None, stderr=None, interactive: bool = False):
        super().__init__(stdin=stdin, stdout=stdout)
        self.net = net
        self.stderr = stderr or sys.stderr
        self.interactive = interactive
        self.use_rawinput = interactive
        self.errors = 0

    # output ---------------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def error(self, msg: str) -> None:
        self.errors += 1
        self.stdout.flush()
        first = (str(msg).strip().splitlines() or ["failed"])[0]
        self.stderr.write(f"error: {first}\n")
        self.stderr.flush()

    # dispatch -------------------------------------------------------------------------------
    def onecmd(self, line: str):
        try:
            return super().onecmd(line)
        except TestbedError as e:  # SpecError, CommandError, CapabilityError
            self.error(str(e))
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            self.say("")
            self.error("interrupted")
        except (OSError, ValueError) as e:
            self.error(f"{type(e).__name__}: {e}")
        return False

    def emptyline(self):  # do not repeat the last command
        return False

    def completenames(self, text, *ignored):
        return super().completenames(text, *ignored) + [
            n for n in self.net.nodes if n.startswith(text)]

    def completedefault(self, text, line, begidx, endidx):
        return [n for n in self.net.nodes if n.startswith(text)]

    def default(self, line: str):
        argv = split_line(line)
        if not argv:
            return False
        if argv[0] in self.net.nodes:
            return self._node_command(argv[0], argv[1:])
        raise SpecError(f"unknown command or node {argv[0]!r} (type help)")

    def do_exec(self, arg):
        """exec <node> <command ...>: run a command in a node (also reaches a node whose name
        is a shell command)."""
        argv = split_line(arg)
        if len(argv) < 2:
            raise SpecError("usage: exec <node> <command ...>")
        self.net[argv[0]]
        return self._node_command(argv[0], argv[1:])

    def _node_command(self, name: str, argv: list) -> bool:
        if not argv:
            raise SpecError(f"usage: {name} <command ...>")
        node = self.net[name]
        argv = substitute_nodes(argv, self.net.nodes,
                                lambda other: self.net[other].ip_toward(node))
        rc = self._stream(node, argv)
        if rc is None:  # stopped with Ctrl-C, like ping usually is: not an error
            return False
        if rc != 0:
            if rc == 127:
                self.error(f"{name}: {argv[0]}: command not found (or could not run)")
            elif rc > 0:
                self.error(f"{name}: {argv[0]} exited with status {rc}")
            else:
                self.error(f"{name}: {argv[0]} killed by signal {-rc}")
        return False

    def _direct(self) -> bool:
        """True if our stdout is the process's real fd 1 (children may write to it)."""
        try:
            return self.stdout is sys.stdout and sys.stdout.fileno() == 1
        except (AttributeError, OSError, ValueError):
            return False

    def _drain(self, p: subprocess.Popen) -> None:
        """Show what a stopped child still had in its pipe (ping's summary after Ctrl-C)."""
        chunks = []
        try:  # without blocking: a grandchild may still hold the pipe open
            fd = p.stdout.fileno()
            os.set_blocking(fd, False)
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (BlockingIOError, OSError, ValueError):
            pass
        if chunks:
            self.stdout.write(b"".join(chunks).decode(errors="replace"))
            self.stdout.flush()

    def _stream(self, node, argv: list) -> int | None:
        """Run argv in node with its output shown as it comes; the exit status, or None if
        it was stopped with Ctrl-C in an interactive session.

        Interactive: the child shares the terminal (and gets Ctrl-C with us). Otherwise its
        stdin is /dev/null, so it cannot eat the commands that follow it on our stdin."""
        from testbed.run import netns_argv

        full = netns_argv(argv, node.ns)
        stdin = None if self.interactive else subprocess.DEVNULL
        direct = self._direct()
        self.stdout.flush()
        sys.stderr.flush()
        try:
            p = subprocess.Popen(full, stdin=stdin,
                                 stdout=None if direct else subprocess.PIPE,
                                 stderr=None if direct else subprocess.STDOUT)
        except FileNotFoundError:
            raise CommandError(full, 127, "", f"command not found: {full[0]}") from None
        try:
            if not direct:
                dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
                fd = p.stdout.fileno()
                while True:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    self.stdout.write(dec.decode(chunk))
                    self.stdout.flush()
                self.stdout.write(dec.decode(b"", final=True))
            return p.wait()
        except KeyboardInterrupt:
            _interrupt(p)
            if not self.interactive:
                raise
            if not direct:
                self._drain(p)
            return None
        except BaseException:  # SystemExit from SIGTERM, a write error: do not leave it running
            _interrupt(p)
            raise
        finally:
            if p.stdout is not None:
                p.stdout.close()

    # information ----------------------------------------------------------------------------
    def do_nodes(self, arg):
        """nodes: list the nodes, by kind."""
        by_kind: dict = {}
        for n in self.net.nodes.values():
            by_kind.setdefault(n.kind, []).append(n.name)
        for kind in ("host", "router", "switch"):
            if kind in by_kind:
                label = {"switch": "switches:"}.get(kind, kind + "s:")
                self.say(f"{label:10} {' '.join(by_kind[kind])}")

    def do_links(self, arg):
        """links: every link with each direction's shaping, its delay backend and state."""
        for ln in self.net.links.values():
            self._show_link(ln)

    def _show_link(self, ln) -> None:
        s = ln.spec
        state = "up" if ln.is_up else "DOWN"
        self.say(f"{s.a}-{s.b}  ({s.intf_a} <-> {s.intf_b})  {state}  backend {ln.backend}")
        self.say(f"    {s.a} -> {s.b}: {format_shaping(ln.shaping['a_to_b'])}")
        self.say(f"    {s.b} -> {s.a}: {format_shaping(ln.shaping['b_to_a'])}")

    def do_net(self, arg):
        """net: each node with its kind, interfaces, addresses and the peer of each interface."""
        peers = {}
        for ln in self.net.plan.links:
            peers[(ln.a, ln.intf_a)] = f"{ln.b}:{ln.intf_b}"
            peers[(ln.b, ln.intf_b)] = f"{ln.a}:{ln.intf_a}"
        width = max((len(n) for n in self.net.nodes), default=4)
        for n in self.net.nodes.values():
            addrs = n.addresses
            parts = []
            for ifname in n.intfs:
                addr = f" {addrs[ifname]}" if ifname in addrs else ""
                parts.append(f"{ifname}{addr} <-> {peers.get((n.name, ifname), '?')}")
            self.say(f"{n.name:{width}}  {n.kind:6}  " + ("; ".join(parts) or "(no interfaces)"))

    do_dump = do_net

    def help_dump(self):
        self.say("dump: the same as net.")

    # changes --------------------------------------------------------------------------------
    def do_link(self, arg):
        a, b, direction, params, up = parse_link_command(split_line(arg))
        link = self.net.link(a, b)
        if not params and up is None:
            self._show_link(link)
            return False
        link.set(direction=orient(direction, a, link.spec.a), up=up, **params)
        self._show_link(link)
        return False

    do_link.__doc__ = f"usage: {LINK_USAGE}"

    # measurements ---------------------------------------------------------------------------
    def do_pingall(self, arg):
        """pingall: every host pings every other host once (-W 1); Mininet's report."""
        if arg.strip():
            raise SpecError("usage: pingall")
        hosts = [n.name for n in self.net.hosts()]
        pairs = [(s, d) for s in hosts for d in hosts if s != d]
        if not pairs:
            self.say("*** fewer than two hosts: nothing to ping")
            return False
        results = ping_pairs(self.net, pairs)
        for line in format_pingall(hosts, results):
            self.say(line)
        if not all(results.values()):
            self.error("pingall: some pings failed")
        return False

    def do_iperf(self, arg):
        """iperf <client> <server> [seconds]: TCP bulk transfer with iperf3 (default 5 s);
        prints the bitrate at the receiver."""
        from testbed.process import listening

        a, b, secs = parse_iperf_args(split_line(arg))
        ca, sb = self.net[a], self.net[b]
        dst = sb.ip_toward(ca)
        port = IPERF_PORT
        self.say(f"*** iperf3 {a} -> {b} ({dst}) for {secs:g} s")
        server = sb.start(["iperf3", "-s", "-1", "-p", str(port)], name=f"iperf3-{port}",
                          ready=listening(sb.ns, port))
        try:
            out = ca.run(["iperf3", "-c", dst, "-p", str(port), "-t", f"{secs:g}", "-J"],
                         timeout=secs + 30, check=False)
            res = parse_iperf_json(out.stdout)
        finally:
            server.stop(grace=1)
            if server in sb.procs:
                sb.procs.remove(server)
        rtx = res["retransmits"]
        self.say(f"{a} -> {b}: {format_bps(res['received_bps'])} received "
                 f"(sent {format_bps(res['sent_bps'])}"
                 + (f", {rtx} retransmits" if rtx is not None else "") + ")")
        return False

    # leaving ----------------------------------------------------------------------------------
    def do_exit(self, arg):
        """exit: tear the network down and leave."""
        return True

    do_quit = do_exit

    def help_quit(self):
        self.say("quit: the same as exit.")

    def do_EOF(self, arg):
        """Ctrl-D: leave."""
        if self.interactive:
            self.say("")
        return True

    def do_help(self, arg):
        if arg.strip():
            return super().do_help(arg)
        self.stdout.write(_HELP)
        self.stdout.flush()
        return False

    # loops ------------------------------------------------------------------------------------
    def run_interactive(self, intro: str = "") -> None:
        """cmdloop with readline history; Ctrl-C cancels the line being typed."""
        history = _load_history()
        self.intro = intro or None
        try:
            while True:
                try:
                    self.cmdloop()
                    return
                except KeyboardInterrupt:  # drop the half-typed line, keep the shell
                    self.stdout.write("\n")
                    self.intro = None
        finally:
            _save_history(history)

    def run_script(self, lines: Iterable[str]) -> None:
        """Each line one command, echoed after the prompt; '#' lines are comments."""
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            self.say(self.prompt + line)
            if self.onecmd(line):
                return


def ping_pairs(net, pairs: list) -> dict:
    """{(src, dst): got a reply} for one `ping -c1 -W1` per pair, a few at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def one(pair):
        src, dst = net[pair[0]], net[pair[1]]
        r = src.run(["ping", "-n", "-c1", "-W1", dst.ip_toward(src)], timeout=10, check=False)
        return pair, r.returncode == 0

    pool = ThreadPoolExecutor(max_workers=min(16, len(pairs)))
    try:
        return dict(pool.map(one, pairs))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _interrupt(p: subprocess.Popen) -> None:
    """After Ctrl-C: the child got SIGINT with us (same process group); make sure it ends."""
    for sig, wait in ((signal.SIGINT, 2.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        if p.poll() is not None:
            return
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:
            continue


def _load_history():
    try:
        import readline
    except ImportError:
        return None
    try:
        readline.read_history_file(HISTORY_FILE)
    except OSError:
        pass
    readline.set_history_length(1000)
    return readline


def _save_history(readline) -> None:
    if readline is None:
        return
    try:
        readline.write_history_file(HISTORY_FILE)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

def load_topology(path: str, params: dict | None = None):
    """Import the Python file at path and return its build(**params) Topology."""
    from testbed.topology import Topology

    if not os.path.isfile(path):
        raise SpecError(f"no topology file {path!r}")
    modname = "testbed_topology_" + "".join(
        c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build = getattr(module, "build", None)
    if not callable(build):
        raise SpecError(f"{path}: defines no build(**params) function")
    try:
        inspect.signature(build).bind(**(params or {}))
    except TypeError as e:
        accepted = ", ".join(inspect.signature(build).parameters) or "none"
        raise SpecError(f"{path}: build(): {e} (parameters: {accepted})") from None
    except ValueError:  # no signature to check (a builtin): let the call itself complain
        pass
    topo = build(**(params or {}))
    if not isinstance(topo, Topology):
        raise SpecError(f"{path}: build() returned {type(topo).__name__}, not a Topology")
    return topo


def summary(net) -> str:
    kinds: dict = {}
    for n in net.nodes.values():
        kinds[n.kind] = kinds.get(n.kind, 0) + 1
    plural = {"host": "hosts", "router": "routers", "switch": "switches"}
    parts = ", ".join(f"{c} {k if c == 1 else plural.get(k, k + 's')}" for k, c in kinds.items())
    build = f"{net.build_s:.2f} s" if net.build_s is not None else "?"
    return (f"*** {net.plan.name}: {len(net.nodes)} nodes ({parts}), {len(net.links)} links, "
            f"delay backend {net.delay_backend}, built in {build}")


def main(path: str, params=None, backend: str = "auto", stdin=None, stdout=None,
         stderr=None) -> int:
    """`testbed cli <file> [--set k=v ...]`: build the file's topology, run the shell on it,
    tear it down. params: a dict (string values are converted to int/float) or a list of
    'key=value' strings. Returns the exit status: 0, 1 if a command failed (when reading
    commands from a pipe or file) or the network failed, 2 for a bad topology or parameter,
    130 if interrupted."""
    from testbed.network import Network

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        interactive = stdin.isatty()
    except (AttributeError, ValueError):
        interactive = False
    try:
        topo = load_topology(path, parse_params(params))
        net = Network(topo, backend=backend)
    except TestbedError as e:
        stderr.write(f"error: {e}\n")
        return 2
    status = 0
    try:
        t0 = time.monotonic()
        net.start()  # on failure or Ctrl-C it tears down what it made
        try:
            if net.build_s is None:
                net.build_s = time.monotonic() - t0
            sh = Shell(net, stdin=stdin, stdout=stdout, stderr=stderr, interactive=interactive)
            stdout.write(summary(net) + "\n")
            shadowed = [n for n in net.nodes if hasattr(sh, "do_" + n)]
            if shadowed:
                stdout.write(f"*** node{'s' if len(shadowed) > 1 else ''} "
                             f"{', '.join(shadowed)} share a command's name: use exec <node> ...\n")
            stdout.flush()
            if interactive:
                sh.run_interactive("type help for the commands, exit or Ctrl-D to leave")
            else:
                sh.run_script(stdin)
                status = 1 if sh.errors else 0
        finally:
            stdout.write("*** tearing down\n")
            stdout.flush()
            _stop_uninterrupted(net)
    except KeyboardInterrupt:
        stdout.flush()
        stderr.write("\nerror: interrupted\n")
        return 130
    except TestbedError as e:
        stdout.flush()
        stderr.write(f"error: {e}\n")
        return 1
    return status


def _stop_uninterrupted(net) -> None:
    """net.stop() with Ctrl-C ignored: a second Ctrl-C (or `timeout` forwarding SIGINT)
    must not abandon namespaces half way through the teardown."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        net.stop()
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        net.stop()
    finally:
        signal.signal(signal.SIGINT, old)


__all__ = ["Shell", "coerce_value", "format_pingall", "format_shaping", "load_topology", "main",
           "orient", "parse_iperf_args", "parse_iperf_json", "parse_link_command",
           "parse_link_value", "parse_params", "parse_value", "split_line", "substitute_nodes"]
