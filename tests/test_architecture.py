"""The package's shape: no import circle, no private member read across modules, every public name documented.

These read the source with ``ast``; they run no model.
"""

import ast
import pathlib
import re

import pytest

import numpyro_simformer

PACKAGE = pathlib.Path(numpyro_simformer.__file__).parent
DOCS = PACKAGE.parent / "docs"
# The NamedTuple API: public methods whose names start with an underscore.
NAMED_TUPLE_API = {"_replace", "_asdict", "_fields", "_make"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, ast.parse(path.read_text(), filename=str(path))


def _imported_modules(name: str, tree: ast.AST, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:  # importing a.b.c runs the package a.b's __init__ first
            parts = target.split(".")
            found |= {".".join(parts[:end]) for end in range(2, len(parts) + 1)}
    return {target for target in found if target in known and target != name}


def test_the_package_has_no_import_circle():
    modules = {name: tree for name, _, tree in _modules()}
    known = set(modules)
    graph = {name: _imported_modules(name, tree, known) for name, tree in modules.items()}
    # a package imports its own submodules to re-export them: that is not a circle
    graph = {name: {target for target in targets if not target.startswith(name + ".")} for name, targets in graph.items()}
    visiting, done, cycles = set(), set(), []

    def visit(name, path):
        if name in done:
            return
        if name in visiting:
            cycles.append(path[path.index(name):] + [name])
            return
        visiting.add(name)
        for target in sorted(graph[name]):
            visit(target, path + [target])
        visiting.discard(name)
        done.add(name)

    for name in sorted(graph):
        visit(name, [name])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def _defined_private_names(tree: ast.AST) -> set[str]:
    """Private names this module defines itself (functions, classes, methods, attributes set on ``self``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {name for name in names if name.startswith("_")}


def _external_names(tree: ast.AST) -> set[str]:
    """Names bound by imports from outside the package (other libraries' privates are not checked here)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names
                      if not alias.name.startswith("numpyro_simformer")}
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("numpyro_simformer"):
            names |= {alias.asname or alias.name for alias in node.names}
    return names


def _private_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """``obj._name`` of a private member another module of the package defines.

    Allowed: ``self``/``cls``, dunders, the NamedTuple API, names the module defines
    itself, and attributes of other libraries' modules.
    """
    own, external = _defined_private_names(tree), _external_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        attribute = node.attr
        if not attribute.startswith("_") or attribute.startswith("__") or attribute in NAMED_TUPLE_API:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"} | external:
            continue
        if attribute in own:
            continue
        found.append((node.lineno, f"{ast.unparse(node.value)}.{attribute}"))
    return found


def _private_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """``from package.module import _name``: a private name of another module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("numpyro_simformer"):
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_reads_another_modules_private_members():
    problems = []
    for name, path, tree in _modules():
        for line, expression in _private_reads(tree) + _private_imports(tree):
            problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {expression}")
    assert not problems, "private members read across module boundaries:\n" + "\n".join(problems)


def test_the_checks_catch_what_they_look_for():
    """The two checks above find a private read and a circle when there is one."""
    tree = ast.parse("import numpy\nvalue = other._secret + self._own + row._replace(a=1).__class__ + numpy._lib\n"
                     "from numpyro_simformer.model.sites import _dims\n")
    assert [expression for _, expression in _private_reads(tree)] == ["other._secret"]
    assert [expression for _, expression in _private_imports(tree)] == ["numpyro_simformer.model.sites._dims"]
    circle = ast.parse("from numpyro_simformer.b import thing")
    assert _imported_modules("numpyro_simformer.a", circle, {"numpyro_simformer.a", "numpyro_simformer.b"}) == {
        "numpyro_simformer.b"}


def _documented_names() -> set[str]:
    text = (DOCS / "api.md").read_text()
    return set(re.findall(r"^:::\s*numpyro_simformer\.([\w.]+)", text, flags=re.M))


@pytest.mark.parametrize("name", sorted(set(numpyro_simformer.__all__) - {"__version__"}))
def test_every_public_name_is_in_the_api_reference(name):
    documented = _documented_names()
    assert name in documented, f"docs/api.md has no '::: numpyro_simformer.{name}' entry"
