"""The tree keeps its shape: no import cycle, small modules, a short top level, the public names
importable where the README imports them, benchmarks and scripts as users of the library (public
seams, no methods replaced, no ``sys.path`` edits), one rule for where an answer ends."""

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
def test_public_names_are_importable(module, name):
    assert callable(getattr(importlib.import_module(module), name))


# attribute names that are sapo objects in the benchmarks and scripts
PRIVATE_REACH = re.compile(
    r"\b(trainer|tr|generator|segment_generator|sampler|ema|reference|buffer|scorer|state)\._[a-z]"
)


# the folders of code that uses sapo as a user would; the tests of the benchmarks and experiments
USERS = ("benchmarks", "experiments", "scripts")
USER_TESTS = ("tests/benchmarks", "tests/experiments")


def user_files(folders=USERS) -> list[Path]:
    return [path for folder in folders for path in sorted((ROOT / folder).glob("*.py"))]


def test_benchmarks_and_scripts_use_public_seams():
    reaches = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in user_files()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_REACH.search(line) or re.search(r"getattr\(\w+, [\"']_[a-z]", line)
    ]
    assert reaches == []


def test_answers_end_by_one_rule():
    """Where an answer ends is ``eos_token_ids(model, tokenizer)``, never the tokenizer's EOS alone."""
    stand_ins = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("src", *USERS)
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\[\s*\w*tokenizer\w*\.eos_token_id\s*\]", line)
    ]
    assert stand_ins == []


def method_replacements(source: str) -> list[int]:
    """Lines that put a function in place of an object's attribute (``obj.name = f`` where ``f``
    is a function of the file, a lambda, ``types.MethodType(...)`` or ``functools.partial(...)``,
    or the same through ``setattr``): timing or instrumenting by replacing a method, where a
    callback, an option or a subclass says what it changes."""
    tree = ast.parse(source)
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef)
    functions = {node.name for node in ast.walk(tree) if isinstance(node, definitions)}

    def is_function(value: ast.expr) -> bool:
        if isinstance(value, ast.Lambda):
            return True
        if isinstance(value, ast.Name):
            return value.id in functions
        if isinstance(value, ast.Call):
            return ast.unparse(value.func).split(".")[-1] in ("MethodType", "partial")
        return False

    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(target, ast.Attribute) for target in targets) and is_function(node.value):
                found.append(node.lineno)
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr" and len(node.args) == 3:
            if is_function(node.args[2]):
                found.append(node.lineno)
    return sorted(found)


def path_edits(source: str) -> list[int]:
    """Lines that change where Python imports from: ``sys.path`` changed in place or assigned,
    ``site.addsitedir``, or a ``PYTHONPATH`` handed to a child process."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if owner == "sys.path" or (owner == "site" and node.func.attr == "addsitedir"):
                found.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(ast.unparse(target).startswith("sys.path") for target in targets):
                found.append(node.lineno)
        elif isinstance(node, ast.Constant) and node.value == "PYTHONPATH":
            found.append(node.lineno)
        elif isinstance(node, ast.keyword) and node.arg == "PYTHONPATH":
            found.append(node.lineno)
    return sorted(found)


def sibling_imports(path: Path) -> list[int]:
    """Lines of a benchmark or experiment that import another module of its folder by its bare
    name, which works only while that folder is first on ``sys.path``: they import it as
    ``benchmarks.<name>`` or ``experiments.<name>``."""
    siblings = {other.stem for other in path.parent.glob("*.py")} - {"__init__"}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else [f".{node.module}"]
        else:
            continue
        if any(name.split(".")[0] in siblings or name.startswith(".") for name in names):
            found.append(node.lineno)
    return sorted(found)


def test_the_source_checks_find_what_they_look_for():
    replaced = """
def timed(*args):
    pass
trainer.get_batch_samples = timed
trainer.generate = types.MethodType(lambda self: 0, trainer)
setattr(generator, "generate", lambda *a: [])
trainer.callback = StepTimer()
"""
    assert method_replacements(replaced) == [4, 5, 6]
    edited = """
sys.path.insert(0, "benchmarks")
sys.path[:0] = ["benchmarks"]
env = dict(os.environ, PYTHONPATH=HERE)
path = sys.path[0]
"""
    assert path_edits(edited) == [2, 3, 4]


@pytest.mark.parametrize("path", user_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_benchmarks_and_scripts_replace_no_method(path):
    assert method_replacements(path.read_text()) == []


@pytest.mark.parametrize(
    "path", user_files((*USERS, *USER_TESTS)), ids=lambda path: str(path.relative_to(ROOT))
)
def test_benchmarks_and_scripts_leave_sys_path_alone(path):
    assert path_edits(path.read_text()) == []


@pytest.mark.parametrize("folder", ["benchmarks", "experiments"])
def test_benchmarks_import_each_other_as_a_package(folder):
    assert (ROOT / folder / "__init__.py").exists()
    bare = {str(path.relative_to(ROOT)): sibling_imports(path) for path in user_files([folder])}
    assert {path: lines for path, lines in bare.items() if lines} == {}


RUNNABLE = [path for path in user_files(["benchmarks", "experiments"]) if "\ndef main(" in path.read_text()]


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda path: str(path.relative_to(ROOT)))
def test_a_benchmark_started_as_a_file_starts_again_as_its_module(path):
    """``python benchmarks/x.py`` puts ``benchmarks/`` first on ``sys.path``, where the package
    does not import: the file starts itself again as ``python -m benchmarks.x``, first thing."""
    source = path.read_text()
    module = f"{path.parent.name}.{path.stem}"
    shim = (
        "if not __package__:  # started as a file: run as the module (benchmarks/__init__.py)\n"
        f'    os.execv(sys.executable, [sys.executable, "-m", "{module}", *sys.argv[1:]])'
    )
    assert shim in source
    assert source.index(shim) < source.index(f"from {path.parent.name}")
