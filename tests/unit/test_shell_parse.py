"""Command parsing of the interactive shell (testbed.shell): pure, no root, no network."""

import json
import os

import pytest

from testbed.errors import SpecError
from testbed.errors import TestbedError as TBError
from testbed.shell import (
    coerce_value,
    format_pingall,
    format_shaping,
    load_topology,
    orient,
    parse_iperf_args,
    parse_iperf_json,
    parse_link_command,
    parse_link_value,
    parse_params,
    split_line,
    substitute_nodes,
)
from testbed.spec import Shaping

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "topologies", "demo.py")


# split_line ---------------------------------------------------------------------------------

def test_split_line_quotes():
    assert split_line("h1 sh -c 'echo a | wc -c'") == ["h1", "sh", "-c", "echo a | wc -c"]
    assert split_line('h1 echo "two words"') == ["h1", "echo", "two words"]
    assert split_line("   ") == []


def test_split_line_unclosed_quote_is_spec_error():
    with pytest.raises(SpecError, match="cannot parse"):
        split_line("h1 echo 'oops")


# substitute_nodes ---------------------------------------------------------------------------

IPS = {"h1": "10.0.0.1", "h2": "10.0.0.2"}


def resolver(name):
    if name == "s1":
        raise TBError("s1 has no address")
    return IPS.get(name)


def test_substitute_replaces_whole_tokens_only():
    argv = ["ping", "-c3", "h2", "h2x", "xh2", "h2-eth0"]
    out = substitute_nodes(argv, ["h1", "h2", "s1"], resolver)
    assert out == ["ping", "-c3", "10.0.0.2", "h2x", "xh2", "h2-eth0"]


def test_substitute_leaves_program_name_alone():
    assert substitute_nodes(["h2", "h2"], ["h2"], resolver) == ["h2", "10.0.0.2"]


def test_substitute_keeps_nodes_without_address():
    # a switch (resolver raises) or a resolver returning None: token unchanged
    assert substitute_nodes(["ping", "s1"], ["s1"], resolver) == ["ping", "s1"]
    assert substitute_nodes(["ping", "r9"], ["r9"], lambda n: None) == ["ping", "r9"]


def test_substitute_several_and_self():
    out = substitute_nodes(["iperf3", "-c", "h2", "-B", "h1"], ["h1", "h2"], resolver)
    assert out == ["iperf3", "-c", "10.0.0.2", "-B", "10.0.0.1"]


def test_substitute_empty_argv():
    assert substitute_nodes([], ["h1"], resolver) == []


# parse_link_value ---------------------------------------------------------------------------

@pytest.mark.parametrize("param,value,expected", [
    ("rate", "10", 10.0),
    ("rate", "10mbit", 10.0),
    ("rate", "1gbit", 1000.0),
    ("rate", "500kbit", 0.5),
    ("bw", "2.5", 2.5),
    ("rate", "off", None),
    ("delay", "10", 10.0),
    ("delay", "10ms", 10.0),
    ("delay", "1s", 1000.0),
    ("delay", "500us", 0.5),
    ("jitter", "2ms", 2.0),
    ("loss", "5", 5.0),
    ("loss", "0.5%", 0.5),
    ("loss", "none", 0.0),
    ("queue", "100", 100),
    ("queue", "100pkts", 100),
    ("queue", "off", None),
])
def test_parse_link_value(param, value, expected):
    assert parse_link_value(param, value) == expected


@pytest.mark.parametrize("param,value", [
    ("rate", "-3"), ("rate", "0"), ("rate", "fast"), ("rate", "10furlongs"),
    ("delay", "-1"), ("delay", "10 parsecs"), ("loss", "101"), ("loss", "-1"),
    ("queue", "0"), ("queue", "1.5"), ("queue", "many"), ("colour", "red"),
])
def test_parse_link_value_rejects(param, value):
    with pytest.raises(SpecError):
        parse_link_value(param, value)


# parse_link_command -------------------------------------------------------------------------

def test_link_rate_both_directions():
    assert parse_link_command(["h1", "s1", "rate", "5"]) == (
        "h1", "s1", "both", {"rate_mbit": 5.0}, None)


def test_link_several_params_and_direction():
    a, b, d, params, up = parse_link_command(
        ["h1", "s1", "a_to_b", "delay", "10ms", "jitter", "2", "loss", "1%", "queue", "50"])
    assert (a, b, d, up) == ("h1", "s1", "a_to_b", None)
    assert params == {"delay_ms": 10.0, "jitter_ms": 2.0, "loss_pct": 1.0, "queue_pkts": 50}


def test_link_key_equals_value_form():
    assert parse_link_command(["h1", "s1", "rate=10mbit", "delay=5"])[3] == {
        "rate_mbit": 10.0, "delay_ms": 5.0}


def test_link_case_insensitive_keywords():
    assert parse_link_command(["h1", "s1", "B_TO_A", "RATE", "3"])[2:4] == (
        "b_to_a", {"rate_mbit": 3.0})


def test_link_down_and_up():
    assert parse_link_command(["h1", "s1", "down"]) == ("h1", "s1", "both", {}, False)
    assert parse_link_command(["h1", "s1", "up"]) == ("h1", "s1", "both", {}, True)
    assert parse_link_command(["h1", "s1", "up", "rate", "4"])[3:] == ({"rate_mbit": 4.0}, True)


def test_link_show_only():
    assert parse_link_command(["h1", "s1"]) == ("h1", "s1", "both", {}, None)


@pytest.mark.parametrize("tokens,match", [
    ([], "usage"),
    (["h1"], "usage"),
    (["h1", "h1", "rate", "3"], "two different"),
    (["h1", "s1", "rate"], "needs a value"),
    (["h1", "s1", "speed", "3"], "unknown parameter"),
    (["h1", "s1", "rate", "3", "rate", "4"], "twice"),
    (["h1", "s1", "rate", "3", "a_to_b"], "right after the names"),
    (["h1", "s1", "up", "down"], "once"),
    (["h1", "s1", "a_to_b", "down"], "both directions"),
    (["h1", "s1", "loss", "200"], "between 0 and 100"),
])
def test_link_errors(tokens, match):
    with pytest.raises(SpecError, match=match):
        parse_link_command(tokens)


def test_orient():
    assert orient("both", "s1", "h1") == "both"
    assert orient("a_to_b", "h1", "h1") == "a_to_b"
    assert orient("a_to_b", "s1", "h1") == "b_to_a"
    assert orient("b_to_a", "s1", "h1") == "a_to_b"
    with pytest.raises(SpecError):
        orient("sideways", "h1", "h1")


# iperf --------------------------------------------------------------------------------------

def test_parse_iperf_args():
    assert parse_iperf_args(["h1", "h2"]) == ("h1", "h2", 5.0)
    assert parse_iperf_args(["h1", "h2", "10"]) == ("h1", "h2", 10.0)
    assert parse_iperf_args(["h1", "h2", "2.5s"]) == ("h1", "h2", 2.5)


@pytest.mark.parametrize("tokens", [[], ["h1"], ["h1", "h1"], ["h1", "h2", "x"],
                                    ["h1", "h2", "0"], ["h1", "h2", "-1"],
                                    ["h1", "h2", "3", "4"]])
def test_parse_iperf_args_rejects(tokens):
    with pytest.raises(SpecError):
        parse_iperf_args(tokens)


def test_parse_iperf_json():
    text = json.dumps({"end": {"sum_sent": {"bits_per_second": 9.9e6, "retransmits": 3},
                               "sum_received": {"bits_per_second": 9.5e6, "seconds": 5.0}}})
    assert parse_iperf_json(text) == {"sent_bps": 9.9e6, "received_bps": 9.5e6,
                                      "seconds": 5.0, "retransmits": 3}


def test_parse_iperf_json_errors():
    with pytest.raises(TBError, match="unable to connect"):
        parse_iperf_json(json.dumps({"error": "unable to connect to server"}))
    with pytest.raises(TBError, match="no JSON"):
        parse_iperf_json("iperf3: error - something\n")
    with pytest.raises(TBError, match="receiver"):
        parse_iperf_json(json.dumps({"end": {}}))


# params -------------------------------------------------------------------------------------

def test_coerce_value():
    assert coerce_value("3") == 3 and isinstance(coerce_value("3"), int)
    assert coerce_value("2.5") == 2.5
    assert coerce_value("1e3") == 1000.0
    assert coerce_value("10ms") == "10ms"
    assert coerce_value("true") is True and coerce_value("False") is False
    assert coerce_value(7) == 7


def test_parse_params():
    assert parse_params(["hosts=4", "delay_ms=2.5", "name=x=y"]) == {
        "hosts": 4, "delay_ms": 2.5, "name": "x=y"}
    assert parse_params({"hosts": "4", "rate_mbit": 10}) == {"hosts": 4, "rate_mbit": 10}
    assert parse_params(None) == {}
    with pytest.raises(SpecError):
        parse_params(["hosts"])
    with pytest.raises(SpecError):
        parse_params(["1x=3"])


# formatting ---------------------------------------------------------------------------------

def test_format_shaping():
    assert format_shaping(Shaping()) == "unshaped"
    assert format_shaping(Shaping.make(rate=10)) == "rate 10 Mbit/s"
    s = Shaping.make(rate="1gbit", delay="5ms", jitter=1, loss=0.5, queue_pkts=100)
    assert format_shaping(s) == "rate 1 Gbit/s, delay 5 ms ± 1 ms, loss 0.5%, queue 100 pkts"
    assert format_shaping(Shaping.make(rate="500kbit")) == "rate 500 kbit/s"


def test_format_pingall():
    hosts = ["h1", "h2", "h3"]
    res = {(s, d): True for s in hosts for d in hosts if s != d}
    res[("h1", "h3")] = False
    lines = format_pingall(hosts, res)
    assert lines[0] == "h1 -> h2 X"
    assert lines[1] == "h2 -> h1 h3"
    assert lines[-1] == "*** Results: 17% dropped (5/6 received)"
    assert format_pingall([], {})[-1] == "*** Results: 0% dropped (0/0 received)"


# topology loading (no network built) ---------------------------------------------------------

def test_load_demo_topology():
    topo = load_topology(DEMO, {"hosts": 4, "delay_ms": 0})
    assert topo.nodes == ["h1", "h2", "h3", "h4", "s1"]
    assert len(topo.links) == 4
    assert all(ln.a_to_b.rate_mbit == 10 and ln.a_to_b.delay_ms == 0 for ln in topo.links)


def test_load_topology_errors(tmp_path):
    with pytest.raises(SpecError, match="no topology file"):
        load_topology(str(tmp_path / "missing.py"))
    nobuild = tmp_path / "nobuild.py"
    nobuild.write_text("x = 1\n")
    with pytest.raises(SpecError, match="no build"):
        load_topology(str(nobuild))
    with pytest.raises(SpecError, match="build"):
        load_topology(DEMO, {"colour": "red"})
    with pytest.raises(SpecError, match="hosts"):
        load_topology(DEMO, {"hosts": 0})


# the Shell's dispatch, on a fake network (no namespaces, no processes) -----------------------

class FakeNode:
    def __init__(self, name, kind, addrs):
        self.name, self.kind, self.ns = name, kind, f"tb-test-{name}"
        self.addresses = addrs
        self.intfs = list(addrs) or [f"{name}-eth0", f"{name}-eth1"]

    def ip_toward(self, other):
        if not self.addresses:
            raise TBError(f"{self.name} has no address")
        return str(next(iter(self.addresses.values())).ip)


class FakeLink:
    def __init__(self, spec):
        self.spec, self.backend, self.is_up = spec, "none", True
        self.shaping = {"a_to_b": spec.a_to_b, "b_to_a": spec.b_to_a}
        self.calls = []

    def set(self, direction="both", up=None, **params):
        self.calls.append((direction, up, params))
        for d in (("a_to_b", "b_to_a") if direction == "both" else (direction,)):
            if params:
                self.shaping[d] = self.shaping[d].replace(**params)
        if up is not None:
            self.is_up = up
        return self


class FakeNet:
    def __init__(self):
        from testbed.topology import Topology

        t = Topology("fake")
        t.add_host("h1")
        t.add_host("h2")
        t.add_switch("s1")
        t.add_link("h1", "s1", rate=10)
        t.add_link("h2", "s1")
        self.plan = t.plan()
        self.nodes = {}
        for name, spec in self.plan.nodes.items():
            addrs = {i: a for (n, i), a in self.plan.addressing.addresses.items() if n == name}
            self.nodes[name] = FakeNode(name, spec.kind, addrs)
        self.links = {ln.key: FakeLink(ln) for ln in self.plan.links}

    def __getitem__(self, name):
        if name not in self.nodes:
            raise SpecError(f"unknown node {name!r}")
        return self.nodes[name]

    def link(self, a, b):
        self[a], self[b]
        try:
            return self.links[frozenset((a, b))]
        except KeyError:
            raise SpecError(f"no link between {a} and {b}") from None

    def hosts(self):
        return [n for n in self.nodes.values() if n.kind == "host"]


def make_shell(rc=0):
    import io

    from testbed.shell import Shell

    out, err = io.StringIO(), io.StringIO()
    sh = Shell(FakeNet(), stdin=io.StringIO(), stdout=out, stderr=err)
    sh.ran = []

    def fake_stream(node, argv):
        sh.ran.append((node.name, argv))
        return rc

    sh._stream = fake_stream
    return sh, out, err


def test_shell_node_command_substitutes_addresses():
    sh, _out, err = make_shell()
    sh.onecmd("h1 ping -c3 h2")
    sh.onecmd("h2 ping s1")  # a switch has no address: left alone
    assert sh.ran == [("h1", ["ping", "-c3", "10.0.0.2"]), ("h2", ["ping", "s1"])]
    assert sh.errors == 0 and err.getvalue() == ""


def test_shell_nonzero_status_is_an_error_line():
    sh, _out, err = make_shell(rc=1)
    sh.onecmd("h1 false")
    assert err.getvalue() == "error: h1: false exited with status 1\n"
    assert sh.errors == 1


def test_shell_unknown_node_and_bad_values_do_not_stop_it():
    sh, _out, err = make_shell()
    assert not sh.onecmd("h9 ls")
    assert not sh.onecmd("link h1 s1 rate -3")
    assert not sh.onecmd("link h1 h2 rate 3")
    assert not sh.onecmd("h1 echo 'unclosed")
    lines = err.getvalue().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert "h9" in lines[0] and "positive" in lines[1] and "no link" in lines[2]
    assert sh.errors == 4


def test_shell_link_set_is_oriented():
    sh, out, _err = make_shell()
    sh.onecmd("link s1 h1 a_to_b delay 10ms")  # typed from s1: the link's b_to_a
    sh.onecmd("link h1 s1 down")
    ln = sh.net.link("h1", "s1")
    assert ln.calls == [("b_to_a", None, {"delay_ms": 10.0}), ("both", False, {})]
    assert ln.shaping["b_to_a"].delay_ms == 10 and ln.shaping["a_to_b"].delay_ms == 0
    assert "DOWN" in out.getvalue()
    assert sh.errors == 0


def test_shell_listings():
    sh, out, _err = make_shell()
    sh.onecmd("nodes")
    sh.onecmd("links")
    sh.onecmd("net")
    text = out.getvalue()
    assert "hosts:     h1 h2" in text and "switches:  s1" in text
    assert "h1 -> s1: rate 10 Mbit/s" in text and "h2 -> s1: unshaped" in text
    assert "h1-eth0 10.0.0.1/24 <-> s1:s1-eth0" in text
    assert sh.errors == 0


def test_shell_script_echoes_and_stops_at_exit():
    sh, out, _err = make_shell()
    sh.run_script(["# a comment", "", "h1 true", "exit", "h2 true"])
    assert sh.ran == [("h1", ["true"])]
    assert out.getvalue().splitlines() == ["testbed> h1 true", "testbed> exit"]


def test_shell_exec_reaches_a_node():
    sh, _out, _err = make_shell()
    sh.onecmd("exec h2 ping h1")
    assert sh.ran == [("h2", ["ping", "10.0.0.1"])]
