"""Linux bridges (the switches, and the middle of a delay-line wire)."""

from __future__ import annotations

from testbed.kernel.link import index


def create_line(name: str, ns: str) -> str:
    """An `ip -batch` line creating bridge `name` straight into namespace `ns`."""
    return f"link add name {name} netns {ns} type bridge stp_state 0 forward_delay 0"


def enslave(ipr, bridge: str, port: str) -> None:
    ipr.link("set", index=index(ipr, port), master=index(ipr, bridge))
