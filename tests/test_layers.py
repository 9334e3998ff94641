"""The package's shape, stated once: which layer may import which, and no private name reached
from another module. Read from the source with ``ast`` (imports inside functions included, those
under ``if TYPE_CHECKING:`` not), so an upward import fails here before it becomes a cycle that
hangs a fresh worker process."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import distumap

ROOT = Path(distumap.__file__).parent

#: bottom first; a module may import its own layer and the layers below it. A module belongs to
#: the layer of the longest prefix that names it. The root package is the one exception both
#: ways: every module may take ``__version__`` from it, and it may name every namespace, since it
#: imports each on first use only (``distumap.tl`` loads nothing until touched).
LAYERS: list[tuple[str, ...]] = [
    ("distumap._errors", "distumap._config", "distumap._format", "distumap._paths"),
    ("distumap._palette",),
    (
        "distumap._compute",
        "distumap._memory",
        "distumap._progress",
        "distumap._shared_paths",
        "distumap._store",
    ),
    ("distumap._stage", "distumap._workers"),
    ("distumap.io.readers",),
    ("distumap.io._ingest_store", "distumap.io._transposition"),
    ("distumap.io._ingest_cells",),
    ("distumap.io._ingest",),
    ("distumap.pp",),
    ("distumap.tl",),
    ("distumap.io.writers", "distumap.pl"),
    ("distumap.io",),
    ("distumap.testing",),
    ("distumap.dashboard",),
    ("distumap.cluster", "distumap.cli"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    return (ROOT / relative).with_suffix(".py").exists() or (
        ROOT / relative / "__init__.py"
    ).exists()


def _layer(module: str) -> int:
    if module == "distumap":
        return 0
    best = max(
        (
            (len(prefix), rank)
            for rank, names in enumerate(LAYERS)
            for prefix in names
            if module == prefix or module.startswith(prefix + ".")
        ),
        default=None,
    )
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return skipped


def _imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every distumap import in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name, None) for a in node.names if a.name.startswith("distumap")
            ]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base == "distumap" or base.startswith("distumap."):
                found += [(node.lineno, base, alias.name) for alias in node.names]
    return found


def _modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in _modules():
        _layer(_module_name(path))


@pytest.mark.parametrize(
    "path", [p for p in _modules() if _module_name(p) != "distumap"], ids=lambda p: _module_name(p)
)
def test_imports_go_downward(path):
    module = _module_name(path)
    upward = []
    for line, base, name in _imports(path):
        target = f"{base}.{name}" if name and _is_module(f"{base}.{name}") else base
        if _layer(target) > _layer(module):
            upward.append(f"{path.name}:{line} imports {target}")
    assert upward == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: _module_name(p))
def test_no_private_name_of_another_module(path):
    module = _module_name(path)
    reached = [
        f"{path.name}:{line} imports {name} from {base}"
        for line, base, name in _imports(path)
        if name
        and name.startswith("_")
        and not name.startswith("__")
        and not _is_module(f"{base}.{name}")
        and base != module
    ]
    assert reached == []


def test_the_rules_catch_an_upward_import_and_a_private_name(tmp_path, monkeypatch):
    """The checks themselves can fail: a store module importing the CLI and a private helper."""
    fake = tmp_path / "distumap"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "cli.py").write_text("def _helper():\n    pass\n")
    (fake / "_store.py").write_text("from distumap.cli import _helper\n")
    monkeypatch.setattr(f"{__name__}.ROOT", fake)
    with pytest.raises(AssertionError, match=r"imports distumap\.cli"):
        test_imports_go_downward(fake / "_store.py")
    with pytest.raises(AssertionError, match=r"imports _helper from distumap\.cli"):
        test_no_private_name_of_another_module(fake / "_store.py")
