#!/usr/bin/env python3
"""Run a command as root under Debian's stock kernel in qemu, on this machine's own files.

    scripts/fullkernel.py [--timeout SECONDS] -- COMMAND [ARG...]
    scripts/fullkernel.py --setup          # only the (cached) set-up

Why: the machines' own kernel has no netem, 802.1Q, GRE or loadable modules, so the tests
that need them run here under the kernel that Debian's linux-image-amd64 depends on, booted
in qemu with TCG (KVM fails on these machines). The guest's / is an overlay of this host's /
(virtio-9p, read-only) under a tmpfs, so the guest sees the same repo, .venv and packages and
may write anywhere without touching the host. The kernel modules a network testbed needs are
modprobe'd first; COMMAND then runs in the current directory if it is inside this repo, else
in the repo's root (same absolute paths as here), with the host's PATH and stdin /dev/null.
The console streams to stdout; the exit status is COMMAND's, read from a marker line on the
serial console (124: timed out, 125: the VM or the set-up failed before reporting one).

Set-up is idempotent and cached under <repo>/.cache/fullkernel/: apt packages
qemu-system-x86, busybox-static and kmod if missing, the linux-image package downloaded, extracted
and depmod'ed, and an initramfs (static busybox + the virtio/9p/overlay modules). A new
kernel version in apt, or a change to this recipe, rebuilds what it affects.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import hashlib
import io
import lzma
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "fullkernel"
#: kmod: depmod here, and modprobe in the guest (which runs this host's binaries).
APT_PACKAGES = ("qemu-system-x86", "busybox-static", "kmod")
META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
MARKER = "TESTBED-FULLKERNEL-EXIT"
EXIT_TIMEOUT, EXIT_VM_FAILED = 124, 125
DEFAULT_TIMEOUT_S = 1800

#: What the initramfs loads to reach its root (their dependencies come from modules.dep;
#: for 6.1 that is virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
#: netfs fscache 9pnet 9pnet_virtio 9p overlay).
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

#: Loaded with modprobe before the command, by two modprobes in parallel (request_module is
#: routed into the chroot too, but a test should not depend on auto-loading). Built-in ones
#: (sch_fq_codel in 6.1) are left out on the host.
TESTBED_MODULES = (
    "veth bridge br_netfilter 8021q vxlan ip_gre gre ipip sit tun ifb dummy "
    "sch_netem sch_htb sch_tbf sch_sfq sch_drr sch_qfq sch_prio sch_hfsc sch_fq_codel "
    "sch_ingress cls_u32 act_mirred nfnetlink_queue xt_NFQUEUE xt_physdev nf_conntrack "
    "iptable_filter nft_compat tcp_bbr"
).split()

P9 = "trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144"

#: Stage 1, PID 1 in the initramfs: mount the overlay root, chroot into it, run the job,
#: report its status, power off. Stays PID 1 (chroot, not switch_root) so that the kernel's
#: request_module helper (run from this root) can reach the real modprobe through the chroot.
INIT = f"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
die() {{ echo "fullkernel: boot failed: $*"; poweroff -f; sleep 5; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /mods/order); do insmod /mods/$m.ko || die "insmod $m"; done
mount -t 9p -o {P9} fkrun /fkrun || die "mount run share"
mount -t 9p -o {P9} hostroot /lower || die "mount host root"
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \\
    || die "mount overlay"
R=/newroot
chroot $R /bin/mkdir -p /lib/modules
mount -t 9p -o {P9} modules $R/lib/modules || die "mount modules"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs $R/run
# /tmp stays the overlay's: a clone under /tmp (as CI's may be) must stay visible
mkdir -p $R/run/fullkernel
cp /fkrun/job.sh $R/run/fullkernel/job.sh
nonce=$(cat /fkrun/nonce)
for d in proc sys dev; do mount --move /$d $R/$d || die "move /$d"; done
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $R/dev/shm
echo /sbin/fk-modprobe > $R/proc/sys/kernel/modprobe
hostname fullkernel
chroot $R /bin/sh /run/fullkernel/job.sh <$R/dev/null
rc=$?
echo "{MARKER}=$rc $nonce"
poweroff -f
sleep 5
"""

#: The kernel's usermode modprobe runs in the initramfs root: forward it into the chroot.
FK_MODPROBE = """#!/bin/sh
exec /bin/busybox chroot /newroot /sbin/modprobe "$@"
"""

#: Stage 2, in the chroot: modules, lo, then the command. Formatted per run.
JOB = """export PATH={path} HOME=/root TERM=dumb TESTBED_FULLKERNEL=1 {extra_env}
read up _ </proc/uptime; read rel </proc/sys/kernel/osrelease
echo "fullkernel: $rel up after $up s; loading modules"
modprobe -a {modules_a} 2>/dev/null & modprobe -a {modules_b} 2>/dev/null & ip link set lo up
wait
loaded=" $(while read m _; do printf '%s ' "$m"; done </proc/modules)"
failed=
for m in {modules_a} {modules_b}; do
    case $loaded in *" $m "*) ;; *) failed="$failed $m";; esac
done
[ -z "$failed" ] || echo "fullkernel: modules that failed to load:$failed"
cd {cwd} || exit 125
read up _ < /proc/uptime
echo "fullkernel: running (guest uptime $up s): "{shown}
{command}
"""

PASSED_ENV = ("LANG", "LC_ALL", "CI", "PYTEST_ADDOPTS")


def say(msg: str) -> None:
    print(f"fullkernel: {msg}", file=sys.stderr, flush=True)


class SetupError(Exception):
    pass


def run(argv: list, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, check=True, **kw)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SetupError(f"{shlex.join(map(str, argv))} failed: {e}") from e


# set-up ---------------------------------------------------------------------------------------

def installed(pkg: str) -> bool:
    p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True,
                       text=True)
    return p.returncode == 0 and "install ok installed" in p.stdout


def ensure_apt_packages() -> None:
    missing = [p for p in APT_PACKAGES if not installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SetupError(f"apt packages missing ({' '.join(missing)}); run as root once")
    say(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env,
        stdout=subprocess.DEVNULL)


def apt_kernel_package() -> str | None:
    """The linux-image-<release> package that linux-image-amd64 depends on, per apt."""
    p = subprocess.run(["apt-cache", "depends", META_PACKAGE], capture_output=True, text=True)
    m = re.search(r"Depends:\s*(linux-image-\d\S*-amd64)\b", p.stdout)
    return m.group(1) if m else None


def ready_releases() -> list:
    return sorted(d.name for d in CACHE.glob("*-amd64") if (d / "tree.ok").exists())


def kernel_release() -> str:
    """Kernel release to use: apt's current one; a cached one if apt knows none (offline).

    apt-cache takes about a second under load, so its answer is kept until apt's lists change.
    """
    lists = Path("/var/lib/apt/lists")
    key = f"{lists.stat().st_mtime_ns if lists.exists() else 0}"
    memo = CACHE / "apt-kernel"
    try:
        memo_key, memo_rel = memo.read_text().split()
        if memo_key == key and (CACHE / memo_rel / "tree.ok").exists():
            return memo_rel
    except (OSError, ValueError):
        pass
    rel = _kernel_release()
    memo.write_text(f"{key} {rel}\n")
    return rel


def _kernel_release() -> str:
    pkg = apt_kernel_package()
    if pkg is None:
        cached = ready_releases()
        if cached:
            return cached[-1]
        if os.geteuid() != 0:
            raise SetupError(f"apt-cache knows no {META_PACKAGE}; run as root once")
        say("apt-cache knows no linux-image-amd64: apt-get update")
        run(["apt-get", "update", "-qq"])
        pkg = apt_kernel_package()
        if pkg is None:
            raise SetupError(f"apt-cache depends {META_PACKAGE} names no linux-image package")
    return pkg[len("linux-image-"):]


def ensure_vmlinux(root: Path, rel: str) -> Path:
    """The kernel to boot: the uncompressed ELF (qemu boots it through its PVH entry point,
    which skips SeaBIOS's loader and a decompression that takes seconds under TCG), or the
    bzImage if it cannot be unpacked."""
    bz = root / "boot" / f"vmlinuz-{rel}"
    elf = root.parent / "vmlinux"
    failed = root.parent / "vmlinux.failed"
    if elf.exists():
        return elf
    if failed.exists():
        return bz
    data = bz.read_bytes()
    at = data.find(b"\xfd7zXZ\x00")
    try:
        if at < 0:
            raise ValueError("no xz stream in the bzImage")
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
        if not out.startswith(b"\x7fELF"):
            raise ValueError("the unpacked kernel is no ELF file")
    except (lzma.LZMAError, ValueError) as e:
        say(f"booting the bzImage ({e})")
        failed.write_text(f"{e}\n")
        return bz
    tmp = elf.with_suffix(".tmp")
    tmp.write_bytes(out)
    tmp.rename(elf)
    return elf


def ensure_tree(rel: str) -> Path:
    """<cache>/<rel>/root: the extracted, depmod'ed kernel package."""
    d = CACHE / rel
    root = d / "root"
    if (d / "tree.ok").exists():
        return root
    if os.geteuid() != 0:
        raise SetupError("the kernel is not set up yet; run as root once")
    say(f"downloading and extracting linux-image-{rel}")
    d.mkdir(parents=True, exist_ok=True)
    dl = d / "download"
    shutil.rmtree(dl, ignore_errors=True)
    dl.mkdir()
    get = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"linux-image-{rel}"]
    if subprocess.run(get, cwd=dl, stdout=subprocess.DEVNULL).returncode != 0:
        run(["apt-get", "update", "-qq"])
        run(get, cwd=dl, stdout=subprocess.DEVNULL)
    debs = list(dl.glob("*.deb"))
    if len(debs) != 1:
        raise SetupError(f"apt-get download left {len(debs)} .deb files in {dl}")
    shutil.rmtree(root, ignore_errors=True)
    run(["dpkg-deb", "-x", str(debs[0]), str(root)])
    if not (root / "boot" / f"vmlinuz-{rel}").exists() or not modules_dir(root, rel).is_dir():
        raise SetupError(f"{debs[0].name} has no boot/vmlinuz-{rel} or lib/modules/{rel}")
    run(["depmod", "-b", str(root), rel])
    shutil.rmtree(dl)
    (d / "tree.ok").write_text(rel + "\n")
    return root


def modules_dir(root: Path, rel: str) -> Path:
    return root / "lib" / "modules" / rel


def module_name(path: str) -> str:
    return re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(path)).replace("-", "_")


def boot_modules(mdir: Path) -> list:
    """(name, path) of BOOT_MODULES and their dependencies, in load order."""
    deps: dict = {}
    paths: dict = {}
    for line in (mdir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        name = module_name(mod)
        paths[name] = mod
        deps[name] = [module_name(x) for x in rest.split()]
    builtin = {module_name(x) for x in (mdir / "modules.builtin").read_text().split()}
    order: list = []

    def visit(name: str) -> None:
        if name in order or name in builtin:
            return
        if name not in deps:
            raise SetupError(f"module {name} is neither in modules.dep nor built in")
        for dep in deps[name]:
            visit(dep)
        order.append(name)

    for m in BOOT_MODULES:
        visit(m)
    return [(name, mdir / paths[name]) for name in order]


def ko_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        return run(["zstd", "-dc", str(path)], capture_output=True).stdout
    if path.name.endswith(".ko.gz"):
        import gzip
        return gzip.decompress(data)
    return data


class Cpio:
    """A minimal newc archive writer (what the kernel unpacks as an initramfs)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple = (0, 0)) -> None:
        nm = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nm), 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + nm)
        self.buf.write(b"\0" * (-(110 + len(nm)) % 4) + data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def ensure_initramfs(root: Path, rel: str) -> Path:
    mods = boot_modules(modules_dir(root, rel))
    bb = BUSYBOX.stat()
    recipe = "\n".join([INIT, FK_MODPROBE, *(str(p) for _, p in mods),
                        f"{bb.st_size} {bb.st_mtime_ns}"])
    out = CACHE / rel / f"initramfs-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.cpio"
    if out.exists():
        return out
    say(f"building the initramfs ({' '.join(n for n, _ in mods)})")
    applets = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    c = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "mods",
              "fkrun", "lower", "upper", "newroot"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for a in applets:
        if a != "bin/busybox":
            c.symlink(a, "/bin/busybox")
    c.file("init", INIT.encode(), 0o755)
    c.file("sbin/fk-modprobe", FK_MODPROBE.encode(), 0o755)
    for name, path in mods:
        c.file(f"mods/{name}.ko", ko_bytes(path))
    c.file("mods/order", "\n".join(n for n, _ in mods).encode() + b"\n")
    for old in out.parent.glob("initramfs-*.cpio"):
        old.unlink()
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(c.finish())
    tmp.rename(out)
    return out


def prune_other_releases(keep: str) -> None:
    for d in CACHE.glob("*-amd64"):
        if d.name == keep or not d.is_dir():
            continue
        with open(CACHE / f"{d.name}.inuse", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a run is using it
            say(f"removing the stale kernel {d.name}")
            shutil.rmtree(d, ignore_errors=True)
            os.unlink(f.name)


def setup() -> tuple:
    """(release, kernel, modules share, initramfs), setting up what is missing or stale."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "setup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_apt_packages()
        rel = kernel_release()
        root = ensure_tree(rel)
        kernel = ensure_vmlinux(root, rel)
        initrd = ensure_initramfs(root, rel)
        prune_other_releases(rel)
        for d in (CACHE / "run").glob("*"):  # left by runs that were killed
            if time.time() - d.stat().st_mtime > 86400:
                shutil.rmtree(d, ignore_errors=True)
    return rel, kernel, root / "lib" / "modules", initrd


# the run --------------------------------------------------------------------------------------

def job_script(command: list, mdir: Path) -> str:
    extra = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in PASSED_ENV
                     if k in os.environ)
    builtin = {module_name(x) for x in (mdir / "modules.builtin").read_text().split()}
    mods = [m for m in TESTBED_MODULES if m not in builtin]
    cwd = os.getcwd()
    if not (cwd == str(REPO) or cwd.startswith(str(REPO) + os.sep)):
        cwd = str(REPO)
    return JOB.format(path=shlex.quote(os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")),
                      extra_env=extra, modules_a=" ".join(mods[0::2]),
                      modules_b=" ".join(mods[1::2]),
                      cwd=shlex.quote(cwd), shown=shlex.quote(shlex.join(command)),
                      command=shlex.join(command))


def qemu_argv(kernel: Path, initrd: Path, modules: Path, rundir: Path) -> list:
    """TCG (KVM fails here). -display none, not -nographic: the latter turns on SeaBIOS's
    serial console, whose escape codes clear the terminal. Nehalem (x86-64-v2, which numpy 2
    wheels require) boots faster under TCG than -cpu max. pci=noacpi saves ~1.5 s of ACPI
    interrupt routing. Shares: the host's / (the overlay's lower layer), the module tree
    (/lib/modules) and this run's job directory."""
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "Nehalem", "-m", "2048", "-smp", "2",
            "-display", "none", "-nodefaults", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1 rdinit=/init pci=noacpi"]
    for tag, path in (("hostroot", "/"), ("modules", modules), ("fkrun", rundir)):
        path = str(path).replace(",", ",,")  # qemu's option syntax
        argv += ["-fsdev", f"local,id={tag},path={path},security_model=none,readonly=on,"
                 "multidevs=remap",
                 "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]
    return argv


def _die_with_parent() -> None:
    """In the qemu child: get SIGKILL if this script dies, so no VM outlives it."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_vm(argv: list, nonce: str, timeout_s: float) -> int:
    # Searched anywhere in a line: COMMAND's output may not end with a newline.
    marker = re.compile(MARKER.encode() + rb"=(\d+) " + nonce.encode() + rb"\s*$")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    out = sys.stdout.buffer

    def show(data: bytes) -> None:
        nonlocal out
        if out is not None:
            try:
                out.write(data)
                out.flush()
            except BrokenPipeError:  # e.g. piped into head: keep running, stop showing
                out = None
    deadline = time.monotonic() + timeout_s
    line, held, status = b"", b"", None
    try:
        fd = proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                say(f"timed out after {timeout_s:g} s; VM stopped")
                return EXIT_TIMEOUT
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunk = held + chunk
            held = b"\r" if chunk.endswith(b"\r") else b""
            chunk = (chunk[:-1] if held else chunk).replace(b"\r\n", b"\n")
            show(chunk)
            *lines, line = (line + chunk).split(b"\n")
            for ln in lines:
                m = marker.search(ln)
                if m:
                    status = int(m.group(1))
            if status is not None:
                break
        if status is None:
            proc.wait()
            say(f"the VM stopped (qemu exit {proc.returncode}) without reporting an exit "
                "status: kernel panic or boot failure, see the console above")
            return EXIT_VM_FAILED
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return status
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="fullkernel", description="Run COMMAND as root under Debian's stock kernel "
        "in qemu, on this machine's filesystem (see the top of this file).")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                    help=f"stop the VM after this long (default {DEFAULT_TIMEOUT_S})")
    ap.add_argument("--setup", action="store_true", help="only set up the cache, run nothing")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command and not args.setup:
        ap.error("no command given (usage: fullkernel [--timeout S] -- COMMAND...)")

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, stop)

    t0 = time.monotonic()
    try:
        rel, kernel, modules, initrd = setup()
    except SetupError as e:
        say(f"set-up failed: {e}")
        return EXIT_VM_FAILED
    if args.setup:
        say(f"ready: {rel} ({time.monotonic() - t0:.1f} s)")
        return 0

    nonce = secrets.token_hex(8)
    rundir = CACHE / "run" / nonce
    rundir.mkdir(parents=True)
    try:
        (rundir / "job.sh").write_text(job_script(command, modules / rel))
        (rundir / "nonce").write_text(nonce + "\n")
        with open(CACHE / f"{rel}.inuse", "a") as inuse:
            fcntl.flock(inuse, fcntl.LOCK_SH)
            t1 = time.monotonic()
            rc = run_vm(qemu_argv(kernel, initrd, modules, rundir), nonce, args.timeout)
    except KeyboardInterrupt:
        say("interrupted; VM stopped")
        return 130
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    say(f"exit {rc}; {time.monotonic() - t0:.1f} s in all "
        f"(set-up check {t1 - t0:.1f} s, VM {time.monotonic() - t1:.1f} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
