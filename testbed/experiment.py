"""Experiments: parameters, quick/full modes, progress, claims; run by `testbed reproduce`.

An experiment is a file experiments/NAME.py with
    PAPER = "004"            # or "emulator"
    TITLE = "Table 1: ..."
    def run(ctx: Context) -> None: ...
It measures on real networks, appends tidy rows with ctx.add(...), records each claim
with ctx.claim(...), draws figures with ctx.figure(name), and the runner writes
results/NAME/{data.csv, summary.json, env.json, *.png}.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from testbed import results
from testbed.errors import TestbedError
from testbed.results import ROOT
EXPERIMENTS_DIR = os.path.join(ROOT, "experiments")


@dataclass
class Claim:
    id: str
    text: str  # the paper's (or the issue's) words
    paper: Optional[float]  # the paper's number, or None where the paper gives none
    measured: Optional[float]
    unit: str
    holds: bool
    why: str


@dataclass
class Context:
    name: str
    mode: str  # "quick", "full", or "smoke" (tiny sizes, for tests: not for results)
    out_dir: str
    rows: list = field(default_factory=list)
    claims: list = field(default_factory=list)
    backends: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    load_at_start: float = field(default_factory=lambda: os.getloadavg()[0])
    cpu_at_start: Optional[list] = field(default_factory=lambda: _cpu_times())
    cpu_at_end: Optional[list] = None  # set when steal_pct is first read

    @property
    def quick(self) -> bool:
        """Quick or smoke: anything short of the papers' sizes."""
        return self.mode in ("quick", "smoke")

    @property
    def smoke(self) -> bool:
        return self.mode == "smoke"

    def pick(self, smoke, quick, full):
        """The value for this mode."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.mode]

    @property
    def steal_pct(self) -> Optional[float]:
        """Share of CPU time the hypervisor took (steal) from the run's start to the first
        time this is read, or None. Experiments read it (through machine) in their claims,
        once the measurements are done, so every claim and summary.json give one figure."""
        if self.cpu_at_end is None:
            self.cpu_at_end = _cpu_times()
        if not self.cpu_at_end or not self.cpu_at_start:
            return None
        d = [b - a for a, b in zip(self.cpu_at_start, self.cpu_at_end)]
        total = sum(d[:8])  # user .. steal (guest time is already in user)
        return round(100.0 * d[7] / total, 1) if total > 0 else None

    @property
    def machine(self) -> str:
        """The machine for a claim's why: '2 cores (1-min load 0.4 when the run began;
        the hypervisor took 6 % of CPU time during it)'."""
        steal = self.steal_pct
        extra = "" if steal is None else (f"; the hypervisor took {steal:g} % of CPU time "
                                          f"during it")
        return (f"{os.cpu_count()} cores (1-min load {self.load_at_start:.1f} when the run "
                f"began{extra})")

    def progress(self, msg: str) -> None:
        """One line on stderr with the elapsed time, so long runs show where they are."""
        print(f"[{self.name} {time.monotonic() - self.started:6.1f}s] {msg}",
              file=sys.stderr, flush=True)

    def add(self, **row) -> None:
        self.rows.append(row)

    def claim(self, id: str, text: str, paper, measured, unit: str, holds: bool,
              why: str) -> None:
        self.claims.append(Claim(id, text, paper, None if measured is None else
                                 float(measured), unit, bool(holds), why))

    def note_network(self, net) -> None:
        """Record which backends a network used (goes to env.json)."""
        self.backends.setdefault("delay", set()).add(net.delay_backend)
        if net.vlan_backend != "none":
            self.backends.setdefault("vlan", set()).add(net.vlan_backend)
        for v in net.backends["links"].values():
            self.backends.setdefault("link_backends", set()).add(v)

    def figure(self, name: str) -> str:
        path = os.path.join(self.out_dir, name if name.endswith(".png") else name + ".png")
        self.figures.append(os.path.basename(path))
        return path


def pyplot():
    """matplotlib.pyplot on the Agg backend: experiments write figures to files, and run
    where there is no display (imported here, not at the top, so that listing or loading
    an experiment does not pay for matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cpu_times() -> Optional[list]:
    """The aggregate 'cpu' line of /proc/stat: user nice system idle iowait irq softirq
    steal ... in clock ticks (None where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    return [int(x) for x in fields[1:]]


def available() -> list:
    """Names of the registered experiments (files in experiments/, not starting with _)."""
    if not os.path.isdir(EXPERIMENTS_DIR):
        return []
    return sorted(f[:-3] for f in os.listdir(EXPERIMENTS_DIR)
                  if f.endswith(".py") and not f.startswith("_"))


def load(name: str):
    if name not in available():
        raise TestbedError(f"unknown experiment {name!r} (known: {', '.join(available())})")
    path = os.path.join(EXPERIMENTS_DIR, name + ".py")
    if ROOT not in sys.path:  # experiments import topologies/ from the checkout
        sys.path.insert(0, ROOT)
    spec = importlib.util.spec_from_file_location(f"experiments.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for attr in ("PAPER", "TITLE", "run"):
        if not hasattr(mod, attr):
            raise TestbedError(f"experiments/{name}.py has no {attr}")
    return mod


def execute(name: str, mode: str = "quick", out_root: Optional[str] = None) -> Context:
    """Run one experiment and write its results directory."""
    if mode not in ("quick", "full", "smoke"):
        raise TestbedError(f"mode must be quick, full or smoke, got {mode!r}")
    mod = load(name)
    out_dir = os.path.join(out_root or os.path.join(ROOT, "results"), name)
    os.makedirs(out_dir, exist_ok=True)
    ctx = Context(name, mode, out_dir)
    ctx.progress(f"start ({mode}): {mod.TITLE}")
    mod.run(ctx)
    runtime = time.monotonic() - ctx.started
    results.write(ctx, mod, runtime)
    held = sum(c.holds for c in ctx.claims)
    ctx.progress(f"done in {runtime:.1f} s: {held}/{len(ctx.claims)} claims hold -> {out_dir}")
    return ctx
