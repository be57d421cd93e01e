"""The package's layers: who may import whom, and no import cycle.

    validation      <- everything (ConfigError and its checks)
    moe             the engine: imports only itself
    distributed     mesh, expert sharding, gradient sync, collectives: imports moe
    data            datasets and tokenizers: imports nothing of ours but validation
    train           the trainer: imports distributed and moe, never a client
    models          the clients: the engine, data, and the task API (`train.tasks`); the
                    trainer's `Config` only as a type
    cli, demo,      entry points: anything
    convert

Read from the source with `ast`, so a new import that breaks a rule fails here, whichever test
imports what first.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe_scale"

ALLOWED = {
    "validation": set(),
    "moe": set(),
    "distributed": {"moe"},
    "data": set(),
    "train": {"distributed", "moe", "data"},
    "models": {"moe", "data", "train.tasks"},
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path))
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(imported moe_scale module, whether only under `if TYPE_CHECKING:`)."""
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found += [(n, id(node) in typing_only) for n in names if n.startswith("moe_scale.")]
    return found


def _allowed(src_layer: str, target: str) -> bool:
    dst_layer = _layer(target)
    if dst_layer in (src_layer, "validation") or src_layer not in ALLOWED:
        return True
    rules = ALLOWED[src_layer]
    modules = ["moe_scale." + r for r in rules if "." in r]
    return dst_layer in rules or any(target == m or target.startswith(m + ".") for m in modules)


def test_no_layer_imports_a_layer_above_it():
    broken = []
    for module, path in _modules():
        src = _layer(module)
        for target, typing_only in _imports(ast.parse(path.read_text())):
            if typing_only and target == "moe_scale.train.config":
                continue  # a client's functions take the trainer's Config; the type costs no import
            if not _allowed(src, target):
                broken.append(f"{module} imports {target}")
    assert not broken, "imports against the layering (see this file's docstring):\n" + "\n".join(broken)


def test_the_rule_catches_a_reaching_import():
    tree = ast.parse("from moe_scale.train.config import Config\nimport moe_scale.models.lm\n")
    assert [t for t, _ in _imports(tree)] == ["moe_scale.train.config", "moe_scale.models.lm"]
    assert not _allowed("moe", "moe_scale.distributed.comm")
    assert not _allowed("distributed", "moe_scale.train.config")
    assert not _allowed("models", "moe_scale.train.config")
    assert _allowed("models", "moe_scale.train.tasks")
    assert not _allowed("models", "moe_scale.train.tasks_extra")


def test_every_module_imports_first_in_a_fresh_package():
    """Each module imported before any other of ours (the package's modules dropped from
    sys.modules in between): an import cycle shows up as an ImportError whichever module a
    user imports first."""
    names = [m for m, _ in _modules() if ".csrc" not in m]
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'moe_scale' or m.startswith('moe_scale.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
