"""Imports run one way, and no module reads another module's private attributes.

The layers, lowest first (a module may import its own layer and those below it):

    base -> spec -> kernel -> runtime -> emulation -> network -> measure -> systems
         -> experiment -> cli

`run` (the one command runner) sits in the kernel layer because the kernel objects are
built with it; the daemon runtime (testbed.daemon) imports nothing of the testbed but
itself, so every layer may use it (the kernel layer's delay-line control does). A system
never imports another system. testbed/ never imports the user's topologies/ or
experiments/; experiments use the public API, not the kernel layer. Every import counts,
those inside functions included, and so does a cycle.

Run as a script on another tree to list its breaches:
    python tests/unit/test_import_order.py /path/to/checkout
"""

from __future__ import annotations

import ast
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

LAYERS = [
    ("base", ["testbed.errors", "testbed.daemon"]),  # the daemon runtime: stdlib only
    ("spec", ["testbed.spec", "testbed.addressing", "testbed.topology", "testbed.queueing"]),
    ("kernel", ["testbed.run", "testbed.kernel"]),
    ("runtime", ["testbed.process", "testbed.poll", "testbed.ledger",
                 "testbed.cleanup", "testbed.sealed", "testbed.files"]),
    # the emulator's own features that systems build on: tunnels are like VLANs, not a
    # system under test (paper 003's WAN migration sets one up)
    ("emulation", ["testbed.capabilities", "testbed.garp", "testbed.delayline",
                   "testbed.tunnel"]),
    ("network", ["testbed.network", "testbed"]),  # the package root re-exports Network
    ("measure", ["testbed.measure"]),
    ("systems", ["testbed.overlay", "testbed.failover", "testbed.migration", "testbed.mirror",
                 "testbed.frr", "testbed.replication"]),
    ("experiment", ["testbed.results", "testbed.experiment"]),
    ("cli", ["testbed.cli", "testbed.shell"]),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}

# Underscore names of other modules that are public by convention: the standard library's
# own (os._exit ends a forked child without running atexit handlers; namedtuple's _replace,
# _asdict, _fields, _make are its public API) and sys._getframe.
ALLOWED_PRIVATE = {"_exit", "_replace", "_asdict", "_fields", "_make", "_getframe"}


def modules(root: pathlib.Path) -> dict:
    """dotted name -> path of every module under root/testbed."""
    out = {}
    for path in sorted((root / "testbed").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer_of(mod: str) -> str:
    best, best_len = None, -1
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best_len:
                best, best_len = name, len(p)
    if best is None:
        raise KeyError(f"{mod} has no layer: add it to LAYERS in {__file__}")
    return best


def system_of(mod: str) -> str:
    return ".".join(mod.split(".")[:2])


def imports(mod: str, path: pathlib.Path, known: dict) -> list:
    """[(lineno, imported module or name, names taken)] of one file, nested ones too."""
    is_pkg = path.name == "__init__.py"
    package = mod if is_pkg else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known:  # `from pkg import module`
                    out.append((node.lineno, sub, []))
                else:
                    out.append((node.lineno, target, [a.name]))
    return out


def owner(name: str, known: dict) -> str:
    """The module of ours that an imported dotted name lives in."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def breaches(root: pathlib.Path = ROOT) -> list:
    known = modules(root)
    found, graph = [], {m: set() for m in known}
    for mod, path in known.items():
        rel = path.relative_to(root)
        for line, target, names in imports(mod, path, known):
            top = target.split(".")[0]
            if top in ("topologies", "experiments"):
                found.append(f"{rel}:{line}: imports the user's {target}")
                continue
            if top != "testbed":
                continue
            dep = owner(target, known)
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    found.append(f"{rel}:{line}: imports private {n} from {dep}")
            if not dep or dep == mod:
                continue
            graph[mod].add(dep)
            lo, hi = layer_of(dep), layer_of(mod)
            if RANK[lo] > RANK[hi]:
                found.append(f"{rel}:{line}: {mod} ({hi}) imports {dep} ({lo}), a higher layer")
            elif (lo == hi == "systems" and system_of(mod) != system_of(dep)):
                found.append(f"{rel}:{line}: system {system_of(mod)} imports another system, "
                             f"{dep}")
            elif (mod.startswith("testbed.daemon")
                  and not dep.startswith("testbed.daemon")):
                found.append(f"{rel}:{line}: the daemon runtime imports {dep}")
        found += private_access(path, rel)
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    found = list(dict.fromkeys(found))  # one line per breach, not per name imported
    for path in sorted((root / "experiments").glob("*.py")):
        rel = path.relative_to(root)
        for line, target, names in imports(path.stem, path, known):
            if target.startswith("testbed.kernel"):
                found.append(f"{rel}:{line}: an experiment imports the kernel layer, {target}")
            for n in names:
                if target.startswith("testbed") and n.startswith("_") and not n.startswith("__"):
                    found.append(f"{rel}:{line}: imports private {n} from {target}")
        found += private_access(path, rel)
    return list(dict.fromkeys(found))


def private_access(path: pathlib.Path, rel) -> list:
    """`x._name` where x is not self/cls and no `_name` is defined in this file: an
    attribute taken from an object of another module."""
    tree = ast.parse(path.read_text(), str(path))
    defined = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            defined.add(node.attr)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__") or name in ALLOWED_PRIVATE:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        if name in defined:
            continue
        out.append(f"{rel}:{node.lineno}: reads {ast.unparse(node)}, private to another module")
    return out


def cycles(graph: dict) -> list:
    """Each strongly connected component of more than one module, as a path (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for mod in modules(ROOT):
        layer_of(mod)


def test_imports_run_one_way_and_nothing_private_is_read():
    found = breaches()
    assert not found, f"{len(found)} breach(es):\n" + "\n".join(found)


def test_the_checker_catches_each_kind_of_breach(tmp_path):
    """A small fake tree with one breach of each kind: each must be reported."""
    files = {
        "testbed/__init__.py": "",
        "testbed/errors.py": "",
        "testbed/kernel/__init__.py": "",
        "testbed/kernel/link.py": "def f():\n    from testbed import network\n",
        "testbed/network.py": "from testbed import cleanup\nclass Network:\n    pass\n",
        "testbed/cleanup.py": "from testbed import network\n",
        "testbed/overlay/__init__.py": "from testbed.mirror import daemon\n",
        "testbed/mirror/__init__.py": "",
        "testbed/mirror/daemon.py": "import topologies.x\nfrom testbed.network import _ipr\n",
        "testbed/tunnel/__init__.py": "def g(net):\n    return net._routes\n",
        "testbed/daemon/__init__.py": "from testbed import errors\n",
        "experiments/e.py": "from testbed.kernel import link\n",
    }
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    found = "\n".join(breaches(tmp_path))
    for want in ("testbed.kernel.link (kernel) imports testbed.network (network)",
                 "system testbed.overlay imports another system",
                 "imports the user's topologies.x",
                 "imports private _ipr",
                 "reads net._routes",
                 "the daemon runtime imports testbed.errors",
                 "an experiment imports the kernel layer",
                 "import cycle: testbed.cleanup -> testbed.network -> testbed.cleanup"):
        assert want in found, f"missing {want!r} in:\n{found}"


if __name__ == "__main__":
    where = pathlib.Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    result = breaches(where)
    print("\n".join(result) or "no breaches")
    print(f"{len(result)} breach(es) in {os.fspath(where)}")
