"""The tree keeps its shape: no import cycle, small modules, a short top level, the public names
where SPEC §2 puts them, benchmarks and scripts on public seams, one rule for where an answer ends."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "sapo"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Every sapo module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from sapo.x import y``: the module sapo.x.y where there is one, else sapo.x
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if name in MODULES else node.module for name in names]
        else:
            assert not isinstance(node, ast.ImportFrom) or node.level == 0, f"{path}: relative import"
            continue
        found.update(name for name in names if name in MODULES)
    return found


def test_no_import_cycle():
    graph = {name: imported_modules(path) - {name} for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_modules_stay_small():
    long = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: lines for name, lines in long.items() if lines > 400} == {}


def test_top_level_has_at_most_16_modules():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= 16, top


@pytest.mark.parametrize(
    "module, name",
    [
        ("sapo", "SAPOConfig"),
        ("sapo", "SAPOTrainer"),
        ("sapo.losses", "dpo_loss"),
        ("sapo.losses", "orpo_loss"),
        ("sapo.segments", "splice"),
        ("sapo.buffer", "ReplayBuffer"),
    ],
)
def test_spec_names_are_importable(module, name):
    assert callable(getattr(importlib.import_module(module), name))


# attribute names that are sapo objects in the benchmarks and scripts
PRIVATE_REACH = re.compile(
    r"\b(trainer|tr|generator|segment_generator|sampler|ema|reference|buffer|scorer|state)\._[a-z]"
)


def test_benchmarks_and_scripts_use_public_seams():
    reaches = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for folder in ("benchmarks", "scripts")
        for path in sorted((ROOT / folder).glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_REACH.search(line) or re.search(r"getattr\(\w+, [\"']_[a-z]", line)
    ]
    assert reaches == []


def test_answers_end_by_one_rule():
    """Where an answer ends is ``eos_token_ids(model, tokenizer)``, never the tokenizer's EOS alone."""
    stand_ins = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("src", "benchmarks", "scripts")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\[\s*\w*tokenizer\w*\.eos_token_id\s*\]", line)
    ]
    assert stand_ins == []
