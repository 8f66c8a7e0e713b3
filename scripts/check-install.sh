#!/usr/bin/env bash
# The install check: `pip install <checkout>` (a wheel, not editable) into a fresh venv in a
# temporary directory outside the checkout, its dependencies at the versions of
# requirements.lock; then, from outside the checkout, import testbed and every module under
# it (pkgutil.walk_packages), check that no import anywhere in them (inside functions too)
# names a module the venv lacks, and run the `testbed` command. Fails naming each module
# that fails: a library module that imports the user's topologies/ or experiments/, or a
# file the wheel leaves out, breaks here and not in the editable checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOUT=$(pwd)
PY=${PYTHON:-python3}

TMP=$(mktemp -d /tmp/testbed-install.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m venv "$TMP/venv"
# dependencies from the lock (constraints: only what the project needs, at the locked
# versions); the build in a copy, so the checkout gets no build/ directory
mkdir "$TMP/src"
tar -C "$CHECKOUT" --exclude=./.venv --exclude=./.cache --exclude=./.git --exclude=./build -c . \
    | tar -C "$TMP/src" -x
# (--no-compile: byte-compiling pandas, matplotlib and scapy took half the time; the
# machine's pip.conf may name local indexes that lack a package: pip's notes on it go)
PYTHONWARNINGS=ignore "$TMP/venv/bin/pip" install -q --no-compile -c requirements.lock "$TMP/src" \
    2> >(grep -v "^WARNING: Location 'file:" >&2)
rm -rf "$TMP/src"

cd "$TMP"
"$TMP/venv/bin/python" -I - "$CHECKOUT" <<'EOF'
import ast
import importlib
import importlib.util
import os
import pkgutil
import sys
import traceback

checkout = sys.argv[1]
# the system packages, named so that a module missing from the wheel cannot pass unnoticed
REQUIRED = ["testbed", "testbed.overlay", "testbed.failover", "testbed.failover.hanet",
            "testbed.migration", "testbed.migration.controller", "testbed.migration.wan",
            "testbed.mirror", "testbed.tunnel", "testbed.frr", "testbed.measure",
            "testbed.experiment", "testbed.cli"]
failed = {}


def fail(name, exc=None):
    exc = exc or sys.exc_info()[1]
    failed[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()


def guarded(node, parents):
    """Inside `try: ... except ImportError` (an optional import)?"""
    for p in parents.get(node, ()):
        if isinstance(p, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in p.handlers):
            return True
    return False


def missing_imports(path):
    """The absolute imports anywhere in a module, functions included, that this venv cannot
    satisfy (such as the checkout's topologies/ or experiments/): import time alone misses
    an import inside a function."""
    tree = ast.parse(open(path).read(), path)
    parents = {}
    for p in ast.walk(tree):
        for c in ast.iter_child_nodes(p):
            parents[c] = parents.get(p, []) + [p]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            tops = [node.module.split(".")[0]]
        else:
            continue
        for top in tops:
            if not guarded(node, parents) and importlib.util.find_spec(top) is None:
                out.append(f"line {node.lineno} imports {top}, not installed")
    return out


import testbed  # noqa: E402

if os.path.realpath(testbed.__file__).startswith(os.path.realpath(checkout) + os.sep):
    sys.exit(f"check-install: testbed was imported from the checkout ({testbed.__file__})")
names = ["testbed"]
for info in pkgutil.walk_packages(testbed.__path__, "testbed.", onerror=fail):
    names.append(info.name)
names = sorted(n for n in set(names + REQUIRED) if not n.endswith(".__main__"))  # runs a daemon
for name in names:
    if name in failed:
        continue
    try:
        mod = importlib.import_module(name)
    except BaseException as exc:  # a module may sys.exit at import
        fail(name, exc)
        continue
    bad = missing_imports(mod.__file__)
    if bad:
        failed[name] = "; ".join(bad)
for name, why in sorted(failed.items()):
    print(f"check-install: FAILED {name}: {why}")
if failed:
    sys.exit(f"check-install: {len(failed)} of {len(names)} modules of testbed fail from a wheel "
             f"installed outside the checkout: {', '.join(sorted(failed))}")
print(f"check-install: {len(names)} modules of testbed import, and import nothing missing, "
      f"from a wheel installed outside the checkout ({os.path.dirname(testbed.__file__)})")
EOF
"$TMP/venv/bin/testbed" --help >/dev/null
echo "check-install: the testbed command runs"
