"""Every registered experiment runs (smoke mode: tiny sizes) and writes the contract's files.
Quick mode is what `make reproduce` runs; its results are committed under results/."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from testbed import experiment

CLAIM_KEYS = {"id", "text", "paper", "measured", "unit", "holds", "why"}


# experiments whose code paths differ by kernel (kernel tunnels, native or HTB-built
# schedulers): also smoke-tested in the stock-kernel VM. Not emulator_vlans and
# emulator_fidelity: under TCG their smokes take 3 and 5 minutes (a third and a half of
# the tier's 15), and their native paths are measured there by tests/kernel/test_vlans.py
# (802.1Q isolation, tags, a change-over under a TCP stream) and by
# test_backends_agree_on_delay_and_loss (netem's delay and loss against the delay line's).
FULLKERNEL = {"emulator_tunnels", "qos_custom_queuing"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.fullkernel)
                                  if n in FULLKERNEL else n for n in experiment.available()])
def test_experiment_writes_results(name, tmp_path):
    experiment.execute(name, "smoke", str(tmp_path))
    out = tmp_path / name
    data = pd.read_csv(out / "data.csv")
    assert len(data) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == name and summary["mode"] == "smoke"
    assert summary["claims"], "an experiment must check at least one claim"
    for c in summary["claims"]:
        assert CLAIM_KEYS <= set(c), c
        assert isinstance(c["holds"], bool)
    env = json.loads((out / "env.json").read_text())
    assert env["kernel"] and env["git_commit"] and isinstance(env["git_uncommitted"], list)
    assert env["kernel_delay_backend"] in ("netem", "delayline")
    # the exact versions: the lock the venv was installed from
    assert len(env["versions"]["requirements_lock_sha256"]) == 64
    # the machine the numbers came from: cores, load, and the hypervisor's steal
    assert f"{os.cpu_count()} cores" in summary["machine"]
    assert env["steal_pct"] is None or 0 <= env["steal_pct"] <= 100
    if env["steal_pct"] is not None:  # one figure for the run, in its claims and summary
        assert f"took {env['steal_pct']:g} % of CPU" in summary["machine"]
        for c in summary["claims"]:
            assert "the hypervisor took" not in c["why"] or \
                f"took {env['steal_pct']:g} % of CPU" in c["why"], c["why"]
    pngs = [f for f in os.listdir(out) if f.endswith(".png")]
    assert pngs and all((out / f).stat().st_size > 10_000 for f in pngs)
    assert set(summary["figures"]) == set(pngs)
