"""`testbed doctor | cli | reproduce | cleanup`."""

from __future__ import annotations

import argparse
import os
import sys

from testbed.errors import TestbedError


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise TestbedError(f"{what} needs root (network namespaces): run it with sudo")


def cmd_doctor(args) -> int:
    from testbed import capabilities

    _need_root("testbed doctor")
    caps = capabilities.probe()
    print(caps.to_json() if args.json else capabilities.report(caps))
    return 0 if caps.delay_backend != "none" and caps.qdiscs.get("htb") else 1


def cmd_cli(args) -> int:
    from testbed import shell

    _need_root("testbed cli")
    params = {}
    for kv in args.set or []:
        if "=" not in kv:
            raise TestbedError(f"--set takes key=value, got {kv!r}")
        k, v = kv.split("=", 1)
        params[k] = shell.parse_value(v) if hasattr(shell, "parse_value") else v
    return shell.main(args.topology, params)


def cmd_reproduce(args) -> int:
    from testbed import experiment, results

    if args.list:
        for name in experiment.available():
            mod = experiment.load(name)
            print(f"{name:32} paper {mod.PAPER:9} {mod.TITLE}")
        return 0
    names = experiment.available() if args.all else args.names
    if not names:
        raise TestbedError("name an experiment, or give --all (see --list)")
    for n in names:  # fail on a bad name before running anything
        experiment.load(n)
    _need_root("testbed reproduce")
    mode = "full" if args.full else "smoke" if args.smoke else "quick"
    out_root = args.out or os.path.join(experiment.ROOT, "results")
    failed = []
    for i, n in enumerate(names, 1):
        print(f"== [{i}/{len(names)}] {n} ({mode})", file=sys.stderr, flush=True)
        try:
            experiment.execute(n, mode, out_root)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one broken experiment must not hide the others' results
            print(f"error: {n}: {e}", file=sys.stderr)
            failed.append(n)
    if args.all or len(names) > 1:
        results.report(out_root)
        print(f"report: {os.path.join(out_root, 'REPORT.md')}", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_cleanup(args) -> int:
    from testbed import cleanup

    if args.list:
        for led in cleanup.runs():
            state = "running" if led["alive"] else "dead"
            print(f"{led['run_id']}  {state:7}  pid {led['pid']}  {led.get('topology')}  "
                  f"{len(led.get('namespaces', []))} namespaces")
        for ns in cleanup.unledgered():
            print(f"unledgered namespace {ns} (remove with --run <id>)")
        return 0
    _need_root("testbed cleanup")
    done = cleanup.cleanup(run_id=args.run)
    for rid, names in done:
        print(f"run {rid}: removed {len(names)} namespaces and their processes")
    if not done:
        print("nothing to clean up")
    left = cleanup.unledgered()
    if left:
        print(f"{len(left)} namespaces with the tb- prefix have no ledger; remove them with "
              f"--run <id> (e.g. {left[0]})")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="testbed", description="Network testbed emulator on "
                                 "Linux network namespaces.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("doctor", help="probe what this kernel can emulate")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("cli", help="build a topology and open an interactive prompt")
    p.add_argument("topology", help="a topology file, e.g. topologies/demo.py")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="parameter for the topology's build()")
    p.set_defaults(func=cmd_cli)
    p = sub.add_parser("reproduce", help="run experiments and write results/")
    p.add_argument("names", nargs="*", help="experiment names (see --list)")
    p.add_argument("--all", action="store_true", help="every experiment, then REPORT.md")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="about a minute each (default)")
    g.add_argument("--full", action="store_true", help="the papers' sizes")
    g.add_argument("--smoke", action="store_true",
                   help="tiny sizes to check that an experiment runs (for tests, not results)")
    p.add_argument("--out", help="results directory (default: results/)")
    p.add_argument("--list", action="store_true", help="list the experiments")
    p.set_defaults(func=cmd_reproduce)
    p = sub.add_parser("cleanup", help="remove what a killed run left behind")
    p.add_argument("--run", help="one run id (the tb-<id>- prefix)")
    p.add_argument("--list", action="store_true", help="show runs and leftovers")
    p.set_defaults(func=cmd_cleanup)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except TestbedError as e:
        print(f"testbed: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
