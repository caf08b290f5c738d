"""Import contract of the package layout (read from the source with ``ast``, nothing imported).

* ``inf/`` is the library: it never imports ``experiments`` (the programs) or ``benchmarks``.
* The low layers of the step path — ``inf/math.py`` (kernel formulas), ``inf/rows.py`` (the row
  store and gradient-rows protocol) and ``inf/functional.py`` (the autograd Function) — never
  import ``inf.layers`` or ``inf.networks``: the step path reads layer → rows → optimizer, in
  one direction.
* Programs under ``experiments/`` reach a network's parts through its layout
  (``input_layer``, ``hidden_layers``, ``output_layer``, ``features``, ``param_roles``), never
  by position (``.layers[0]``, ``.layers[-1]``).

Each rule is checked on a small synthetic source too, so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOW_LAYERS = ("inf/math.py", "inf/rows.py", "inf/functional.py")
FORBIDDEN_IN_LOW = ("inf.layers", "inf.networks")


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of every module ``source`` (the text of ``module``, dotted) imports,
    relative imports resolved, including imports inside functions."""
    package = module.rsplit(".", 1)[0] if "." in module else ""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names.add(target)
            # `from inf import layers` imports the module inf.layers
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] + ["__init__"]
    return ".".join(parts)


def _reaches(names: set[str], forbidden: str) -> bool:
    return any(n == forbidden or n.startswith(forbidden + ".") for n in names)


def positional_layer_indexing(source: str) -> list[int]:
    """Line numbers of ``<expr>.layers[<int>]`` (``layers[0]``, ``layers[-1]``, …)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "layers"
        ):
            index = node.slice
            if isinstance(index, ast.UnaryOp) and isinstance(index.op, ast.USub):
                index = index.operand
            if isinstance(index, ast.Constant) and isinstance(index.value, int):
                lines.append(node.lineno)
    return lines


# --------------------------------------------------------------------------- the checker itself


def test_checker_sees_every_import_form():
    src = (
        "import experiments.cli\nfrom experiments import runs\nfrom . import layers\n"
        "from .networks import InfMLP\n"
        "def f():\n    from ..experiments import models\n"
    )
    names = imported_modules(src, "inf.sub.mod")
    assert {"experiments.cli", "experiments.runs", "inf.sub.layers", "inf.sub.networks"} <= names
    assert _reaches(imported_modules("from . import layers\n", "inf.rows"), "inf.layers")
    assert _reaches(imported_modules("from .networks import X\n", "inf.math"), "inf.networks")
    assert positional_layer_indexing(
        "a = net.layers[0]\nb = net.layers[-1]\nc = net.layers[i]\nd = layers[0]\n"
    ) == [1, 2]


# --------------------------------------------------------------------------- the contract


def _sources(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        yield path, path.read_text(encoding="utf-8")


def test_library_never_imports_programs():
    bad = []
    for path, source in _sources("inf"):
        names = imported_modules(source, _module_name(path))
        bad += [
            f"{path.relative_to(ROOT)} imports {n}"
            for n in sorted(names)
            if _reaches({n}, "experiments") or _reaches({n}, "benchmarks")
        ]
    assert not bad, "inf/ must not depend on experiments/ or benchmarks/:\n" + "\n".join(bad)


@pytest.mark.parametrize("low", LOW_LAYERS)
def test_low_layers_never_import_layers_or_networks(low):
    path = ROOT / low
    if not path.exists():
        pytest.skip(f"{low} does not exist in this tree")
    names = imported_modules(path.read_text(encoding="utf-8"), _module_name(path))
    bad = [n for n in sorted(names) for f in FORBIDDEN_IN_LOW if _reaches({n}, f)]
    assert not bad, f"{low} imports {bad}: the step path must read layer → rows → optimizer"


def test_programs_use_the_network_layout_not_positions():
    bad = []
    for path, source in _sources("experiments"):
        bad += [f"{path.relative_to(ROOT)}:{line}" for line in positional_layer_indexing(source)]
    assert not bad, (
        "index layers through net.input_layer / hidden_layers / output_layer / "
        "features(), not by position:\n" + "\n".join(bad)
    )
