"""The probe finds what it claims by creating it; doctor and its JSON agree."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testbed import capabilities

pytestmark = pytest.mark.kernel


# the probe's answers depend on the kernel: also run in the stock-kernel VM. Doctor's output
# and the CLI's errors do not (and under TCG each doctor run takes about 40 s).
@pytest.mark.fullkernel
def test_probe_finds_the_basics_and_cleans_up(root_state):
    caps = capabilities.probe(refresh=True)
    assert caps.links["veth"] and caps.links["bridge"]
    assert caps.qdiscs["htb"] and caps.qdiscs["pfifo"]
    assert caps.delay_backend in ("netem", "delayline")
    assert caps.tools["ip"] and caps.tools["tc"]
    root_state.assert_unchanged()


@pytest.mark.fullkernel
def test_probe_agrees_with_a_direct_attempt():
    """netem is reported present exactly when tc can really add it."""
    caps = capabilities.probe()
    ns = "tb-probe-test-netem"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"],
                       check=True)
        rc = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "pa", "root", "netem",
                             "delay", "1ms"], capture_output=True).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
    assert caps.qdiscs["netem"] == (rc == 0)


def test_doctor_json_and_text():
    out = subprocess.run([sys.executable, "-m", "testbed.cli", "doctor", "--json"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert data["delay_backend"] in ("netem", "delayline")
    text = subprocess.run([sys.executable, "-m", "testbed.cli", "doctor"],
                          capture_output=True, text=True, check=True).stdout
    assert f"delay/loss backend: {data['delay_backend']}" in text


def test_cli_bad_experiment_is_one_line_error():
    res = subprocess.run([sys.executable, "-m", "testbed.cli", "reproduce", "no_such_thing"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown experiment 'no_such_thing'" in lines[0]
