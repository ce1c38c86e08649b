"""The rules of the code's layout, read from the source with ``ast`` (nothing is imported):
no import circle, editing and evaluation never import each other, no function over 60 lines
or 8 parameters, and the runner under 300 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "editexp"
SIBLINGS = ("editexp.editing", "editexp.evaluation")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The ``editexp`` modules that ``path`` imports (anywhere in it, lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {name: imports_of(path, modules) - {name} for name, path in paths.items()}
    for name in graph:  # importing a.b.c runs a/__init__ and a/b/__init__ too
        graph[name] = {target for target in graph[name] if not name.startswith(target + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_the_package_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_editing_and_evaluation_do_not_import_each_other():
    crossing = [
        f"{name} -> {target}"
        for name, targets in import_graph().items()
        for target in targets
        for here, there in (SIBLINGS, SIBLINGS[::-1])
        if name.startswith(here) and target.startswith(there)
    ]
    assert crossing == []


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8
MAX_RUNNER_LINES = 300


def parameter_count(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Parameters of a function, ``*args`` and ``**kwargs`` included, ``self`` / ``cls`` not."""
    args = function.args
    names = [arg.arg for arg in args.posonlyargs + args.args + args.kwonlyargs]
    names += [arg.arg for arg in (args.vararg, args.kwarg) if arg is not None]
    return len([name for name in names if name not in ("self", "cls")])


def oversized_functions(root: Path) -> list[str]:
    """Every function under ``root`` longer than MAX_FUNCTION_LINES (from its ``def`` to its
    last line) or with more than MAX_PARAMETERS parameters, as ``path:name lines params``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            parameters = parameter_count(node)
            if lines > MAX_FUNCTION_LINES or parameters > MAX_PARAMETERS:
                where = path.relative_to(root.parent)
                found.append(f"{where}:{node.name} {lines} lines, {parameters} parameters")
    return found


def test_no_function_is_over_60_lines_or_8_parameters():
    assert oversized_functions(PACKAGE) == []


def test_the_runner_is_under_300_lines():
    assert len((PACKAGE / "runner.py").read_text().splitlines()) < MAX_RUNNER_LINES


def test_the_size_check_finds_long_and_wide_functions(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    (package / "sizes.py").write_text(
        f"def long():\n{body}\n\n"
        "def wide(a, b, c, d, e, f, g, h, *rest):\n    return a\n\n"
        "class Holder:\n"
        "    def method(self, a, b, c, d, e, f, g, h):\n        return a\n"
    )
    assert oversized_functions(package) == [
        "pkg/sizes.py:long 61 lines, 0 parameters",
        "pkg/sizes.py:wide 2 lines, 9 parameters",
    ]


ROOT = PACKAGE.parent
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"
DOC_PATH = re.compile(r"^(?:editexp|conf|tests|hydra_plugins|docs)/[\w./-]*$")
DOTTED_NAME = re.compile(r"^editexp(?:\.\w+)+$")
CLASS_MEMBER = re.compile(r"^[A-Z]\w*\.\w+$")


def defined_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """The names a module or class body defines (functions, classes, assignments, imports)."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update({target.id: node for target in node.targets if hasattr(target, "id")})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(alias.asname or alias.name).split(".")[0]: node for alias in node.names})
    return names


def exported_lazily(body: list[ast.stmt], name: str) -> ast.AST | None:
    """The module's ``__all__`` when it lists ``name`` and a module ``__getattr__`` serves
    it (imported on first use)."""
    names = defined_names(body)
    exported = names.get("__all__")
    if "__getattr__" not in names or not isinstance(exported, ast.Assign):
        return None
    listed = ast.literal_eval(exported.value)
    return exported if name in listed else None


def module_file(dotted: str) -> Path | None:
    path = ROOT.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def resolves(dotted: str) -> bool:
    """Whether ``editexp.a.b`` is a module, or a module followed by names defined in it (a
    class's members included)."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:split]))
        if path is None:
            continue
        body: list[ast.stmt] = ast.parse(path.read_text()).body
        for name in parts[split:]:
            node = defined_names(body).get(name) or exported_lazily(body, name)
            if node is None:
                return False
            body = node.body if isinstance(node, ast.ClassDef) else []
        return True
    return False


def classes_in_package() -> dict[str, list[ast.ClassDef]]:
    classes: dict[str, list[ast.ClassDef]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append(node)
    return classes


def missing_in_doc(text: str) -> list[str]:
    """The backticked paths, ``editexp.*`` names and ``Class.member`` names of ``text`` that do
    not exist (placeholders such as ``<name>`` are left alone)."""
    classes = classes_in_package()
    missing = []
    for name in sorted(set(re.findall(r"`([^`\s]+)`", text))):
        if "<" in name:
            continue
        if DOC_PATH.match(name):
            exists = (ROOT / name).exists()
        elif DOTTED_NAME.match(name):
            exists = resolves(name)
        elif CLASS_MEMBER.match(name):
            owner, member = name.split(".")
            exists = any(member in defined_names(node.body) for node in classes.get(owner, []))
        else:
            continue
        if not exists:
            missing.append(name)
    return missing


def test_every_name_in_the_architecture_doc_exists():
    assert missing_in_doc(ARCHITECTURE_DOC.read_text()) == []


def test_the_doc_check_finds_what_does_not_exist():
    text = (
        "`editexp/runner.py` `editexp.runner.edit_all` `Editor.edit` `editexp.editing.<name>`"
        " `editexp/nonesuch.py` `editexp.runner.nonesuch` `Editor.nonesuch` `Nonesuch.edit`"
    )
    assert missing_in_doc(text) == [
        "Editor.nonesuch",
        "Nonesuch.edit",
        "editexp.runner.nonesuch",
        "editexp/nonesuch.py",
    ]


def unresolved_imports(root: Path) -> list[str]:
    """``editexp`` imports anywhere under ``root`` (lazy ones too) that name no module or no
    name defined in it, as ``path: name``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            where = path.relative_to(ROOT)
            found += [f"{where}: {name}" for name in names if not importable(name)]
    return found


def importable(name: str) -> bool:
    return name.split(".")[0] != "editexp" or resolves(name)


def test_every_editexp_import_exists():
    assert unresolved_imports(PACKAGE) + unresolved_imports(ROOT / "tests") == []


def test_the_import_check_finds_a_module_that_does_not_exist():
    assert importable("editexp.layer_stats.HELD_OUT_STRIDE") and importable("editexp.Editor")
    assert not importable("editexp.stats.HELD_OUT_STRIDE") and not importable("editexp.Nonesuch")
