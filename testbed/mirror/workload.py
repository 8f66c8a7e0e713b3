"""Workload generator: volumes, daily change sets with rewrite locality, background load.

Daily change rates follow the paper's week (1.12 % to 3.69 % of the volume per day, mean
2.32 %): WEEK below has exactly those min, max and mean. Locality (0..1) sets how clustered
the rewritten blocks are: 0 picks blocks uniformly at random, 1 rewrites long contiguous
runs (mean run length 1 + 63 x locality blocks).
"""

from __future__ import annotations

import os
import random
from testbed.mirror.volume import DEFAULT_BLOCK, nblocks

PAPER_MIN_PCT, PAPER_MAX_PCT, PAPER_MEAN_PCT = 1.12, 3.69, 2.32
# Monday .. Sunday: weekdays busy, weekends quiet; min 1.12, max 3.69, mean 2.32
WEEK = {"mon": 3.69, "tue": 2.71, "wed": 2.48, "thu": 2.57, "fri": 2.40, "sat": 1.12,
        "sun": 1.27}
WEEKDAY_PCT = sum(WEEK[d] for d in ("mon", "tue", "wed", "thu", "fri")) / 5
WEEKEND_PCT = (WEEK["sat"] + WEEK["sun"]) / 2


class WorkloadError(ValueError):
    pass


def _check(pct: float, locality: float) -> None:
    if not 0 <= pct <= 100:
        raise WorkloadError(f"change rate must be 0..100 %, got {pct!r}")
    if not 0 <= locality <= 1:
        raise WorkloadError(f"locality must be 0..1, got {locality!r}")


def make_volume(path: str, size_bytes: int, seed: int = 0) -> str:
    """A file volume of pseudo-random (incompressible) bytes."""
    if size_bytes <= 0 or size_bytes > 64 << 30:
        raise WorkloadError(f"volume size must be 1 B .. 64 GiB, got {size_bytes!r}")
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size_bytes
        while left:
            n = min(left, 4 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


def pick_blocks(total: int, count: int, locality: float, rng: random.Random) -> list:
    """count distinct block indexes out of total, clustered by locality."""
    count = min(count, total)
    mean_run = 1 + 63 * locality
    chosen: set = set()
    while len(chosen) < count:
        run = max(1, int(rng.expovariate(1 / mean_run) + 0.5)) if locality > 0 else 1
        start = rng.randrange(total)
        for i in range(start, min(total, start + run)):
            if len(chosen) >= count:
                break
            chosen.add(i)
    return sorted(chosen)


def change(path: str, pct: float, block_size: int = DEFAULT_BLOCK, locality: float = 0.5,
           seed: int = 1) -> list:
    """Rewrite pct % of a file volume's blocks (new random bytes); returns their indexes."""
    _check(pct, locality)
    rng = random.Random(seed)
    size = os.path.getsize(path)
    total = nblocks(size, block_size)
    blocks = pick_blocks(total, round(total * pct / 100), locality, rng)
    with open(path, "r+b") as f:
        for b in blocks:
            n = min(block_size, size - b * block_size)
            f.seek(b * block_size)
            f.write(rng.randbytes(n))
    return blocks


def make_tree(path: str, files: int, mean_kib: int = 512, seed: int = 0,
              block_size: int = DEFAULT_BLOCK) -> list:
    """A directory volume of `files` files with log-normal sizes around mean_kib KiB
    (at least one block each), in a few subdirectories. Returns [(name, size)]."""
    if not 1 <= files <= 100000:
        raise WorkloadError(f"files must be 1..100000, got {files!r}")
    rng = random.Random(seed)
    out = []
    for i in range(files):
        size = max(block_size, int(rng.lognormvariate(0, 1) * mean_kib * 1024 / 1.65))
        name = f"d{i % 8}/f{i:05d}.dat"
        full = os.path.join(path, name)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(rng.randbytes(size))
        out.append((name, size))
    return out


def change_tree(path: str, pct: float, block_size: int = DEFAULT_BLOCK, locality: float = 0.5,
                seed: int = 1) -> dict:
    """Rewrite pct % of a directory volume's blocks, clustered by locality across the
    concatenation of its files (sorted), so a run of rewritten blocks stays in one file or
    spills into the next. Returns {file name: [changed block indexes]}."""
    _check(pct, locality)
    rng = random.Random(seed)
    names = []
    for root, _, fs in os.walk(path):
        names += [os.path.relpath(os.path.join(root, f), path) for f in fs]
    names.sort()
    layout = []  # (name, first global block, blocks, size)
    g = 0
    for n in names:
        size = os.path.getsize(os.path.join(path, n))
        k = nblocks(size, block_size)
        layout.append((n, g, k, size))
        g += k
    chosen = pick_blocks(g, round(g * pct / 100), locality, rng)
    out: dict = {}
    li = 0
    for b in chosen:
        while b >= layout[li][1] + layout[li][2]:
            li += 1
        n, first, _, size = layout[li]
        out.setdefault(n, []).append(b - first)
    for n, blocks in out.items():
        size = os.path.getsize(os.path.join(path, n))
        with open(os.path.join(path, n), "r+b") as f:
            for b in blocks:
                f.seek(b * block_size)
                f.write(rng.randbytes(min(block_size, size - b * block_size)))
    return out


def background(net, src: str, dst: str, schedule: list, port: int = 5301) -> list:
    """Start a background load schedule on the link(s) between src and dst: schedule is
    [(start_s, seconds, rate_mbit or None for as fast as TCP goes)], one iperf3 flow each,
    the flows started by one supervised shell-free Python timer process per flow. Returns
    the client Processes (stopped at teardown, or by the caller)."""
    import sys

    from testbed.process import listening

    procs = []
    for i, (start_s, seconds, rate) in enumerate(schedule):
        if start_s < 0 or seconds <= 0:
            raise WorkloadError(f"bad background entry {(start_s, seconds, rate)!r}")
        p = port + i
        net[dst].start(["iperf3", "-s", "-p", str(p)], name=f"bg-iperf3-s{p}",
                       ready=listening(net[dst].ns, p))
        argv = ["iperf3", "-c", net[dst].ip_toward(net[src]), "-p", str(p), "-t",
                f"{seconds:g}"] + (["-b", f"{rate:g}M"] if rate else [])
        code = ("import os,sys,time; time.sleep(float(sys.argv[1])); "
                "os.execvp(sys.argv[2], sys.argv[2:])")
        procs.append(net[src].start([sys.executable, "-c", code, f"{start_s:g}"] + argv,
                                    name=f"bg-iperf3-c{p}"))
    return procs


def daily_capacity_gib(rate_mbit: float, efficiency: float, binary_mbit: bool = True) -> float:
    """GiB a link moves in a day at this efficiency (the paper counts a Mbit as 2^20 bits:
    85 % of 1.544 Mbit/s = 13.84 GB/day)."""
    bits = rate_mbit * (1 << 20 if binary_mbit else 1e6) * efficiency * 86400
    return bits / 8 / (1 << 30)


def max_store_gib(daily_gib: float, change_pct: float) -> float:
    return daily_gib / (change_pct / 100)


def rate_for_store_mbit(store_gib: float, change_pct: float, efficiency: float,
                        binary_mbit: bool = True) -> float:
    bits = store_gib * (change_pct / 100) * (1 << 30) * 8
    return bits / 86400 / efficiency / (1 << 20 if binary_mbit else 1e6)
