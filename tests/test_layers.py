"""The package's layers hold: statistics free of transport and outputs, and no cycles.

Each statistics module is imported in a fresh interpreter and its ``sys.modules`` is
read, so an import added anywhere below it (a Flower record, a site helper, a plot) is
caught. The import graph is read from the source (every import, also those inside
functions; ``if TYPE_CHECKING:`` blocks excepted) and must have no cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders installed as radfed's subpackages (pyproject's package-dir).
PACKAGES = {
    "radfed": ROOT / "radfed",
    "radfed.server": ROOT / "server",
    "radfed.client": ROOT / "client",
    "radfed.shared": ROOT / "shared",
    "radfed.harmonization": ROOT / "harmonization",
    "radfed.experiments": ROOT / "experiments",
    "radfed.deploy": ROOT / "deploy",
}

#: What the statistics (both halves of each federated step) and the study driver
#: must never load: the transports' Flower, the site code, MLflow and plotting.
FORBIDDEN = ("flwr", "mlflow", "matplotlib", "radfed.client", "radfed.deploy")


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()
STATISTICS = sorted(
    name
    for name in MODULES
    if name.startswith(("radfed.server.stats.", "radfed.harmonization."))
    or name.endswith("_stats")
    or name in ("radfed.shared.logistic", "radfed.shared.privacy")
)
# Flower-free above the transports: the driver runs over any Transport.
STUDY = ["radfed.server.study.driver", "radfed.server.study.phases", "radfed.server.study.external"]


def test_the_statistics_are_found():
    assert {"radfed.server.stats.lasso", "radfed.harmonization.combat"} <= set(STATISTICS)
    assert "radfed.shared.selection_stats" in STATISTICS


@pytest.mark.parametrize("module", STATISTICS + STUDY)
def test_statistics_import_no_transport_site_code_tracking_or_plots(module):
    code = (
        f"import json, sys, {module}\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"('flwr', 'mlflow', 'matplotlib') or m.startswith(('radfed.client', 'radfed.deploy')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT.parent
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"{module} loads {loaded[:8]}"


def _imports(name: str, path: Path) -> set[str]:
    """The radfed modules ``path`` imports anywhere (TYPE_CHECKING blocks excepted)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in MODULES and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert _cycles(graph) == []


def test_every_module_says_what_it_holds_in_its_first_line():
    silent = [
        name
        for name, path in MODULES.items()
        if path.stat().st_size and not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert silent == []


def test_the_readme_layout_names_every_coordinator_room():
    readme = (ROOT / "README.md").read_text()
    rooms = sorted(p.name for p in (ROOT / "server").iterdir() if (p / "__init__.py").is_file())
    assert rooms == ["federation", "outputs", "stats", "study", "tracking"]
    missing = [room for room in rooms if f"`server/{room}/`" not in readme]
    assert missing == []
