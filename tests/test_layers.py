"""The package's layers point one way: no module imports a module of a higher layer.

The import graph is read from the source with ``ast`` (every ``import`` statement, those inside
functions included), so a lazy import cannot hide an upward edge. Every module must be placed in
a layer here: a new module makes this test fail until it is.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastem_ext"

# Bottom to top (DESIGN.md, STYLE.md): a module may import its own layer and the layers below.
LAYERS = [
    ("foundation", {"checks", "hardware", "png16", "io", "physics", "centring", "restarts",
                    "schedule", "observation", "boundary", "motion", "noise", "metrics", "models",
                    "tiles", "crops", "manifest", "batch_plan", "distributed"}),
    ("ops", {"ops"}),
    ("algorithms", {"mstep", "guidance", "deconv"}),
    ("sampling", {"step", "samplers", "engine", "progress", "priors"}),
    ("interface", {"settings", "api", "aot", "batch", "cli", "demo", "launch", "photo", ""}),
    # "": __init__
]


def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module (a package is named by its directory)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fastem_ext modules that ``name`` imports, anywhere in its source."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: level 1 is this package, 2 its parent, ...
                parent = package[: len(package) - node.level + 1]
                base = ".".join(parent + base.split(".")).strip(".")
            # "from a import b" imports the module a.b where there is one, else names of a.
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                         for a in node.names)
    return {m for m in found if m.split(".")[0] == PACKAGE.name}


def _layer(name: str) -> int:
    """The rank of ``fastem_ext[.first[.rest]]``: the layer holding ``first``."""
    first = name.split(".")[1] if "." in name else ""
    for rank, (_, members) in enumerate(LAYERS):
        if first in members:
            return rank
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def test_every_import_points_down():
    modules = _modules()
    upward = [f"{name} ({LAYERS[_layer(name)][0]}) imports {target} "
              f"({LAYERS[_layer(target)][0]})"
              for name, path in sorted(modules.items())
              for target in sorted(_imports(name, path, modules))
              if _layer(target) > _layer(name)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_walk_sees_lazy_and_relative_imports():
    """Known edges: function-level, two-dot and package-relative imports are all seen."""
    modules = _modules()

    def edges(name: str) -> set[str]:
        return _imports(name, modules[name], modules)

    assert "fastem_ext.ops" in edges("fastem_ext.mstep")  # inside hqs()
    assert "fastem_ext.models.natural_prior" in edges("fastem_ext.priors")
    assert {"fastem_ext.schedule", "fastem_ext.ops._backend"} <= edges("fastem_ext.ops.wiener_z")
    assert "fastem_ext.ops.ddpm_update" in edges("fastem_ext.ops")
    assert "fastem_ext.api" in edges("fastem_ext")
    assert _layer("fastem_ext.ops.wiener_z") < _layer("fastem_ext.mstep") < _layer("fastem_ext")


def test_every_public_name_resolves_lazily():
    """``__all__``, the lazy table and the TYPE_CHECKING imports name the same objects."""
    import fastem_ext

    assert set(fastem_ext.__all__) == {*fastem_ext._EXPORTS, "metrics"}
    for name in fastem_ext.__all__:
        assert getattr(fastem_ext, name) is not None
    assert {"__name__", "__doc__", "__path__", *fastem_ext.__all__} <= set(dir(fastem_ext))
