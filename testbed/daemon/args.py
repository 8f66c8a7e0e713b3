"""Command-line parsing for daemons: every error is one line, `NAME: message`, exit 2."""

from __future__ import annotations

import argparse
import ipaddress
import sys


class UsageError(Exception):
    """Bad input found after parsing (a key file, a config): run_main() prints
    `NAME: message` on one line and exits 2."""


class ArgParser(argparse.ArgumentParser):
    """argparse with the daemon's short name in front of a one-line error, exit 2."""

    def __init__(self, name: str, **kw):
        kw.setdefault("prog", f"python -m testbed.{name}")
        super().__init__(**kw)
        self.name = name

    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.name}: {message}\n")

    def add_subparsers(self, **kw):
        """Sub-commands are ArgParsers too, with the same name in front of their errors."""
        if "parser_class" not in kw:
            name = self.name
            kw["parser_class"] = lambda **pkw: ArgParser(name, **pkw)
        return super().add_subparsers(**kw)

    def exit(self, status: int = 0, message=None) -> None:
        if message:
            sys.stderr.write(message)
        raise SystemExit(status)


def port(text: str) -> int:
    """An argparse type: a UDP/TCP port, 1..65535."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {v}")
    return v


def ipv4(text: str) -> str:
    """An argparse type: an IPv4 address, normalised."""
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 address: {text!r}") from None


def addr(text: str) -> tuple:
    """An argparse type: IP:PORT -> (ip, port)."""
    host, sep, p = str(text).rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"want IP:PORT, got {text!r}")
    return ipv4(host), port(p)


def int_in(lo: int, hi: int):
    """An argparse type: an integer in lo..hi."""

    def check(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}, got {v}")
        return v

    return check


def float_in(lo: float, hi: float):
    """An argparse type: a number in lo..hi."""

    def check(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo <= v <= hi:  # also false for NaN
            raise argparse.ArgumentTypeError(f"must be in {lo:g}..{hi:g}, got {text}")
        return v

    return check
