"""The package's import structure: no import cycles between its modules, nothing runtime
imports the test model maker (devmodels), and every module imports where the POSIX-only
standard modules do not exist (Windows), because only ovms_plugin.osutil touches them, and
only inside its functions."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import ovms_plugin

PACKAGE = "ovms_plugin"
ROOT = Path(ovms_plugin.__file__).parent
POSIX_ONLY = ("fcntl", "resource", "termios", "pwd", "grp")
PLATFORM_MODULE = "ovms_plugin.osutil"  # the one module that may import POSIX_ONLY
TEST_MODEL_MAKER = "ovms_plugin.devmodels"


def _modules() -> dict[str, Path]:
    """Every module of the package (the package itself too) -> its source file, found on disk
    without importing anything."""
    found = {PACKAGE: ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], PACKAGE + "."):
        rel = Path(*info.name.split(".")[1:])
        found[info.name] = ROOT / rel / "__init__.py" if info.ispkg else \
            ROOT / rel.with_suffix(".py")
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or in any function or class body, except under
    `if TYPE_CHECKING:` (never executed)."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _imported(name: str, tree: ast.AST) -> set[str]:
    """The modules `name` imports: absolute module names, relative imports resolved;
    `from pkg import sub` names the submodule pkg.sub when there is one."""
    is_pkg = MODULES[name].name == "__init__.py"
    out: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        if node.level:
            parts = name.split(".") if is_pkg else name.split(".")[:-1]
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.add(sub if sub in MODULES else base)
    return out


def _graph() -> dict[str, set[str]]:
    """The package's own import graph: module -> the package's modules it imports."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[name] = {m for m in _imported(name, tree)
                       if m in MODULES and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) for each strongly
    connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for group in groups:  # a shortest way back to the group's first module, breadth first
        start = min(group)
        came_from: dict[str, str] = {}
        frontier = [start]
        while start not in came_from:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & group):
                    if w not in came_from:
                        came_from[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while (prev := came_from[path[-1]]) != start:
            path.append(prev)
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    tree = ast.parse(textwrap.dedent("""
        import ovms_plugin.store.store
        from . import paths
        from .store import pull
        from ovms_plugin import builtin, __version__
        def f():
            from ovms_plugin.http.server import main
        if TYPE_CHECKING:
            from ovms_plugin import cli
    """))
    found = {m for m in _imported("ovms_plugin.devices", tree) if m in MODULES}
    assert found == {"ovms_plugin.store.store", "ovms_plugin.paths", "ovms_plugin.store.pull",
                     "ovms_plugin.builtin", "ovms_plugin", "ovms_plugin.http.server"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


# Cycles known and not yet removed, each as the set of its modules (none today). It only
# keeps new cycles out while old ones wait to be removed; the test says when one is gone.
KNOWN_CYCLES: list[set[str]] = []


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    new = [c for c in cycles if set(c) not in KNOWN_CYCLES]
    assert not new, "import cycles (lazy imports in functions count):\n" + \
        "\n".join(" -> ".join(c) for c in new)
    gone = [k for k in KNOWN_CYCLES if k not in [set(c) for c in cycles]]
    assert not gone, f"no longer cycles, remove them from KNOWN_CYCLES: {gone}"


def test_cli_is_imported_by_nothing_but_the_entry_point() -> None:
    users = sorted(m for m, deps in _graph().items() if "ovms_plugin.cli" in deps)
    assert users == ["ovms_plugin.__main__"]


def test_runtime_code_does_not_import_the_test_model_maker() -> None:
    users = sorted(m for m, deps in _graph().items() if TEST_MODEL_MAKER in deps)
    assert users == []


def test_only_the_platform_module_names_posix_only_modules() -> None:
    """Not even inside functions: what differs between systems lives in osutil."""
    offenders = []
    for name, path in MODULES.items():
        if name == PLATFORM_MODULE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in _import_nodes(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if not node.level else []
            offenders += [f"{path.relative_to(ROOT.parent)}:{node.lineno} imports {n}"
                          for n in names if n.split(".")[0] in POSIX_ONLY]
    assert not offenders, "\n".join(offenders)


# Runs in a fresh interpreter: makes the POSIX-only modules unimportable for the package's own
# modules, then imports every module given on the command line and prints the failures as JSON.
#
# Only imports made BY ovms_plugin modules are refused. Third-party packages (aiohttp, grpc,
# huggingface_hub, openvino...) and the standard library import some of these modules at import
# time on Linux (e.g. filelock imports fcntl, subprocess-related code imports them) and choose
# other code on Windows themselves; refusing them here would fail for reasons that are not
# ours. A sys.meta_path finder alone would miss the modules a third-party package imported
# already (sys.modules answers without asking the finders), hence three hooks, each refusing
# when the importing module (its globals' __name__) is ovms_plugin or below:
# - builtins.__import__, which every import statement calls, cached or not;
# - importlib.import_module, likewise;
# - a sys.meta_path finder, first in the list, for any other way to a module not yet imported
#   (it looks for the nearest caller outside importlib).
_CHILD = r"""
import builtins, importlib, importlib.abc, importlib.util, json, sys, traceback

BLOCKED = frozenset(json.loads(sys.argv[1]))
PACKAGE = "ovms_plugin"


def _ours(module_name):
    return module_name == PACKAGE or (module_name or "").startswith(PACKAGE + ".")


def _refuse(name):
    raise ModuleNotFoundError(f"No module named {name!r} (POSIX-only; blocked for this test)",
                              name=name)


_real_import = builtins.__import__


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.partition(".")[0] in BLOCKED and _ours((globals or {}).get("__name__")):
        _refuse(name)
    return _real_import(name, globals, locals, fromlist, level)


_real_import_module = importlib.import_module


def _import_module(name, package=None):
    if name.partition(".")[0] in BLOCKED and _ours(sys._getframe(1).f_globals.get("__name__")):
        _refuse(name)
    return _real_import_module(name, package)


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] not in BLOCKED:
            return None
        frame = sys._getframe(1)
        while frame is not None and (
                frame.f_code.co_filename.startswith("<frozen importlib")
                or frame.f_globals.get("__name__", "").startswith("importlib")):
            frame = frame.f_back
        if frame is not None and _ours(frame.f_globals.get("__name__")):
            _refuse(fullname)
        return None


builtins.__import__ = _import
importlib.import_module = _import_module
sys.meta_path.insert(0, Blocker())

failures = {}
for name in sys.argv[2:]:
    try:
        if "=" in name:  # NAME=FILE: the file, imported as the module NAME
            name, _, file = name.partition("=")
            spec = importlib.util.spec_from_file_location(name, file)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        else:
            _real_import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-4)
print(json.dumps(failures))
"""


def _run_child(names: list[str]) -> dict[str, str]:
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(POSIX_ONLY), *names],
                       capture_output=True, text=True, timeout=120, cwd=ROOT.parent)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_blocker_refuses_our_imports_only(tmp_path: Path) -> None:
    """The check below can fail: a module of ours that imports a POSIX-only module at import
    time, or through importlib, is refused; the standard library and third-party packages
    still get them, before and after."""
    probes = {  # module name -> its code; fcntl and grp are imported already (by filelock
        # and tarfile), termios is not
        "ovms_plugin._probe1": "import fcntl",
        "ovms_plugin._probe2": "def f():\n    from grp import getgrgid\nf()",
        "ovms_plugin._probe3": "import importlib\nimportlib.import_module('grp')",
        "ovms_plugin._probe4": "import importlib.util\nimportlib.util.find_spec('termios')",
        "not_ours": "import fcntl, grp, termios, resource, pwd",
    }
    args = ["filelock", "tarfile"]
    for name, code in probes.items():
        (tmp_path / f"{name}.py").write_text(code + "\n")
        args.append(f"{name}={tmp_path / name}.py")
    failures = _run_child(args)
    assert sorted(failures) == [f"ovms_plugin._probe{i}" for i in range(1, 5)]
    for i, blocked in enumerate(["fcntl", "grp", "grp", "termios"], 1):
        assert f"No module named '{blocked}'" in failures[f"ovms_plugin._probe{i}"]


def test_every_module_imports_without_posix_only_modules() -> None:
    failures = _run_child(sorted(MODULES))
    assert not failures, "\n\n".join(f"{name}:\n{tb}" for name, tb in failures.items())


def test_platform_file_lock_serializes_threads_and_processes(tmp_path: Path) -> None:
    """What the pull, download and test-model locks rely on: exclusive and blocking, between
    the threads of one process and between processes."""
    import threading
    import time

    from ovms_plugin.osutil import file_lock, peak_rss_bytes

    lock = tmp_path / "x.lock"
    inside: list[int] = []
    overlaps: list[int] = []

    def hold(i: int) -> None:
        with file_lock(lock):
            inside.append(i)
            if len(inside) > 1:
                overlaps.append(i)
            time.sleep(0.05)
            inside.remove(i)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not overlaps and not inside

    code = ("import sys, time\nfrom ovms_plugin.osutil import file_lock\n"
            "with file_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(0.5)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE,
                             text=True, cwd=ROOT.parent)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with file_lock(lock):
            waited = time.monotonic() - started
    finally:
        child.wait(10)
    assert waited > 0.2
    assert (peak_rss_bytes() or 0) > 10 * 2**20


def test_openvino_telemetry_is_off_in_the_plugins_processes(tmp_path: Path):
    """Every process imports the package first; OpenVINO's converter then takes its no-op
    telemetry, which neither counts uses in the home folder nor forks a sender."""
    code = ("import ovms_plugin, openvino_genai, openvino_tokenizers\n"
            "import openvino.tools.ovc.telemetry_utils as t\nprint(t.tm.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT.parent, env={"HOME": str(tmp_path),
                                                            "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "openvino.tools.ovc.telemetry_stub"
    assert not (tmp_path / "intel").exists()
