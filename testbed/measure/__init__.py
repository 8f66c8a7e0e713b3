"""Measurements from nodes, returned as tidy pandas DataFrames (one row per sample)."""

from testbed.measure.iperf import iperf3
from testbed.measure.ping import ping
from testbed.measure.tcpstream import stream as tcp_stream
from testbed.measure.udpprobe import outages, udp_probe

__all__ = ["iperf3", "ping", "udp_probe", "outages", "tcp_stream"]
