"""The systems keep no module-level registries keyed by the network: what they attach is
owned by the network (net.own / net.owned), and HANet's parallel links are Network's own."""

import ast
import pathlib

import pytest

import testbed.failover.hanet as hanet
import testbed.overlay as overlay
import testbed.tunnel as tunnel

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module, names", [
    (overlay, ["_running"]),
    (tunnel, ["_nets", "_state", "_State"]),
    (hanet, ["_EXTRA_LINKS", "_parallel_link_class", "_ParallelLink"]),
], ids=["overlay", "tunnel", "hanet"])
def test_registries_are_gone(module, names):
    for name in names:
        assert not hasattr(module, name), f"{module.__name__}.{name} is back"


def test_no_weak_registries_in_the_library():
    """A WeakKeyDictionary at module level keyed by the network stands in for net.own()."""
    found = []
    for path in sorted((ROOT / "testbed").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("WeakKeyDictionary",
                                                                 "WeakValueDictionary"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


def test_network_no_longer_makes_tunnels():
    from testbed.network import Network

    assert not hasattr(Network, "add_tunnel") and not hasattr(Network, "tunnels")
