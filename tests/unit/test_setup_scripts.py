"""The set-up scripts: make test's time budget (scripts/testtime.sh) with short fake tiers,
and the lock's header, which scripts/setup.sh reads."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TESTTIME = REPO / "scripts" / "testtime.sh"


def run_testtime(tmp_path, *args, budget_s=1500, limit_s=3600):
    env = dict(os.environ, TESTTIME_DIR=str(tmp_path), TESTTIME_BUDGET_S=str(budget_s),
               TESTTIME_LIMIT_S=str(limit_s))
    return subprocess.run(["bash", str(TESTTIME), *args], env=env, capture_output=True,
                          text=True, timeout=30)


def run_tiers(tmp_path, *tiers):
    """tiers: (name, shell command); returns the exit status of each `run`."""
    assert run_testtime(tmp_path, "start").returncode == 0
    return [run_testtime(tmp_path, "run", name, "bash", "-c", cmd).returncode
            for name, cmd in tiers]


def test_summary_prints_each_tier_and_pytest_closing_line(tmp_path):
    assert run_tiers(tmp_path, ("host", "echo '=== 5 passed, 1 skipped in 2.01s ==='"),
                     ("fullkernel", "true")) == [0, 0]
    out = run_testtime(tmp_path, "summary")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.split()[:3] == ["host", "0m00s", "ok"] and "(5 passed, 1 skipped in 2.01s)"
               in line for line in lines), out.stdout
    assert any(line.split()[:3] == ["fullkernel", "0m00s", "ok"] for line in lines)
    assert any(line.split()[:2] == ["total", "0m00s"] for line in lines)
    assert "WARNING" not in out.stdout and "FAILED" not in out.stdout


def test_summary_reads_the_quiet_closing_line_too(tmp_path):
    """pytest -q closes without the ===: `836 passed, 8 skipped in 708.08s (0:11:48)`."""
    run_tiers(tmp_path, ("host", "echo '836 passed, 8 skipped in 708.08s (0:11:48)'"))
    out = run_testtime(tmp_path, "summary")
    assert "(836 passed, 8 skipped in 708.08s (0:11:48))" in out.stdout, out.stdout


def test_past_the_budget_warns_but_passes(tmp_path):
    run_tiers(tmp_path, ("host", "true"), ("fullkernel", "true"))
    out = run_testtime(tmp_path, "summary", budget_s=-1)
    assert out.returncode == 0
    warning = [line for line in out.stdout.splitlines() if line.startswith("WARNING:")]
    assert len(warning) == 1 and "host 0m00s, fullkernel 0m00s" in warning[0], out.stdout


def test_past_the_limit_fails_naming_the_tiers_times(tmp_path):
    run_tiers(tmp_path, ("host", "true"), ("fullkernel", "true"))
    out = run_testtime(tmp_path, "summary", budget_s=-2, limit_s=-1)
    assert out.returncode == 1
    assert "FAILED: make test took 0m00s, past the limit" in out.stdout
    assert "host 0m00s, fullkernel 0m00s" in out.stdout
    assert "WARNING" not in out.stdout


def test_a_failing_tier_fails_the_summary_and_keeps_its_time(tmp_path):
    assert run_tiers(tmp_path, ("host", "exit 3"), ("fullkernel", "true")) == [3, 0]
    out = run_testtime(tmp_path, "summary")
    assert out.returncode == 1
    assert any(line.split()[:4] == ["host", "0m00s", "FAILED", "(exit"]
               for line in out.stdout.splitlines()), out.stdout
    assert "failed tier(s): host (host 0m00s, fullkernel 0m00s)" in out.stdout


def test_summary_without_tiers_fails(tmp_path):
    run_testtime(tmp_path, "start")
    assert run_testtime(tmp_path, "summary").returncode == 1


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_test_runs_every_tier_and_fails_on_one(tmp_path):
    """make test's own recipe, each tier's $(MAKE) replaced by a fake that takes no time."""
    fake = tmp_path / "fake-make"
    fake.write_text("#!/bin/bash\nfor a; do t=$a; done\n"
                    "[ \"$t\" = test-fullkernel ] && exit 1\necho \"fake $t\"\n")
    fake.chmod(0o755)
    env = dict(os.environ, TESTTIME_DIR=str(tmp_path / "times"))
    out = subprocess.run(["make", "--no-print-directory", "-o", "setup", "test", f"MAKE={fake}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "fake test-host" in out.stdout and "fake check-install" in out.stdout
    tiers = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
    assert tiers == ["host", "fullkernel", "install", "total"], out.stdout
    assert "failed tier(s): fullkernel" in out.stdout


def test_lock_header_names_its_python():
    """setup.sh compares the lock's `# python: X.Y` line with .venv's Python."""
    lines = (REPO / "requirements.lock").read_text().splitlines()
    python = [line for line in lines if line.startswith("# python: ")]
    assert len(python) == 1 and python[0].split()[-1].count(".") == 1
    pins = [line for line in lines if line and not line.startswith((" ", "#"))]
    assert pins and all("==" in pin for pin in pins), pins
