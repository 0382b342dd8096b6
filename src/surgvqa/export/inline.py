"""Copy named top-level definitions of surgvqa modules, with everything they use, into one piece of source code.

A challenge submission is a single script that the organizers' runner downloads without surgvqa (which is not on
PyPI), yet it must type questions, build candidate sets and constrain decoding exactly as ``surgvqa predict``
does. Rather than a second, hand-kept copy of that logic, the exporter copies the library's own definitions:
for each requested name, the top-level statement defining it, the statements those use (followed through
``from surgvqa.x import y``), and the imports of outside packages they need. The script starts with
``from __future__ import annotations``, so an annotation is never evaluated; still, a name it uses must be defined
for a linter (and for a reader) to make sense of it: an outside name used only in annotations is imported under
``if TYPE_CHECKING:`` (no runtime cost, no new requirement), a surgvqa one is copied like any other.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

PACKAGE = "surgvqa"


@dataclass
class _Module:
    name: str
    source: str
    statements: list[ast.stmt]
    defined_by: dict[str, int] = field(default_factory=dict)  # name -> index of the statement binding it


def _bound_names(statement: ast.stmt) -> list[str]:
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [statement.name]
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return [(alias.asname or alias.name).split(".")[0] for alias in statement.names]
    targets: list[ast.expr] = []
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, (ast.AnnAssign, ast.AugAssign)):
        targets = [statement.target]
    return [node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name)]


@cache
def _module(name: str) -> _Module:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot find the source of module {name}")
    source = Path(spec.origin).read_text(encoding="utf-8")
    statements = ast.parse(source).body
    module = _Module(name, source, statements)
    for index, statement in enumerate(statements):
        for bound in _bound_names(statement):
            module.defined_by.setdefault(bound, index)
    return module


class _UsedNames(ast.NodeVisitor):
    """Names a statement reads when it runs (``names``) and names only its annotations read (``annotations``)."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.annotations: set[str] = set()

    def visit_Name(self, node: ast.Name) -> None:
        self.names.add(node.id)

    def _annotation(self, node: ast.expr | None) -> None:
        if node is not None:
            self.annotations.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name))

    def visit_arg(self, node: ast.arg) -> None:
        self._annotation(node.annotation)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._annotation(node.annotation)
        self.visit(node.target)
        if node.value is not None:
            self.visit(node.value)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._annotation(node.returns)
        for item in (*node.decorator_list, node.args, *node.body):
            self.visit(item)

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_arguments(self, node: ast.arguments) -> None:
        for argument in (*node.posonlyargs, *node.args, node.vararg, *node.kwonlyargs, node.kwarg):
            if argument is not None:
                self.visit_arg(argument)
        for default in (*node.defaults, *node.kw_defaults):
            if default is not None:
                self.visit(default)


def _used_names(statement: ast.stmt) -> tuple[set[str], set[str]]:
    """(the names the statement reads at run time, those only its annotations read)."""
    visitor = _UsedNames()
    visitor.visit(statement)
    return visitor.names, visitor.annotations - visitor.names


def inline_definitions(roots: Sequence[tuple[str, str]]) -> str:
    """Source code defining each ``(module, name)`` of ``roots`` and everything it needs, dependencies first.

    Outside imports come first, then each module's statements in their original order. Two modules defining
    one name differently is an error (the copies share one namespace).
    """
    chosen: dict[str, set[int]] = {}
    outside_imports: set[str] = set()
    annotation_imports: set[str] = set()
    origin_of: dict[str, tuple[str, int]] = {}  # a name in the shared namespace -> where it is defined
    depends_on: dict[str, set[str]] = {}  # module -> the surgvqa modules it takes names from
    # (module, name, the module that asked for it, whether only annotations ask for it)
    pending: list[tuple[str, str, str | None, bool]] = [(module, name, None, False) for module, name in roots]
    while pending:
        module_name, name, wanted_by, for_annotation = pending.pop()
        module = _module(module_name)
        index = module.defined_by.get(name)
        if index is None:
            if wanted_by is None and not hasattr(builtins, name):
                raise ValueError(f"{module_name} defines no top-level {name!r}")
            continue  # a builtin, or a local name of the statement that asked (a parameter, a loop variable)
        statement = module.statements[index]
        if isinstance(statement, ast.ImportFrom) and (statement.module or "").split(".")[0] == PACKAGE:
            alias = next(a for a in statement.names if (a.asname or a.name) == name)
            if alias.asname:
                raise ValueError(f"{module_name}: 'import ... as {alias.asname}' cannot be inlined")
            depends_on.setdefault(module_name, set()).add(statement.module)
            pending.append((statement.module, alias.name, module_name, for_annotation))
            continue
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            (annotation_imports if for_annotation else outside_imports).add(_single_import(statement, name))
            continue
        previous = origin_of.setdefault(name, (module_name, index))
        if previous != (module_name, index):
            raise ValueError(f"{name!r} is defined in both {previous[0]} and {module_name}")
        if index in chosen.setdefault(module_name, set()):
            continue
        chosen[module_name].add(index)
        runtime, annotations = _used_names(statement)
        pending.extend((module_name, used, module_name, False) for used in sorted(runtime))
        pending.extend((module_name, used, module_name, True) for used in sorted(annotations))
    parts = ["\n".join(sorted(outside_imports))]
    if typing_only := sorted(annotation_imports - outside_imports):
        parts[0] += "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n" + \
            "\n".join(f"    {line}" for line in typing_only)
    for module_name in _dependencies_first(chosen, depends_on):
        module = _module(module_name)
        parts.append(f"\n# --- from {module_name} " + "-" * max(0, 100 - len(module_name)))
        parts.extend(_statement_source(module, module.statements[i]) for i in sorted(chosen[module_name]))
    return "\n\n".join(parts) + "\n"


def _statement_source(module: _Module, statement: ast.stmt) -> str:
    """A top-level statement's lines, decorators included (an AST node starts at its ``def`` / ``class``)."""
    first = min([statement.lineno, *(d.lineno for d in getattr(statement, "decorator_list", ()))])
    return "\n".join(module.source.splitlines()[first - 1:statement.end_lineno])


def _dependencies_first(modules: Iterable[str], depends_on: dict[str, set[str]]) -> list[str]:
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name not in ordered:
            for dependency in sorted(depends_on.get(name, ())):
                visit(dependency)
            ordered.append(name)

    for name in sorted(modules):
        visit(name)
    return [name for name in ordered if name in modules]


def _single_import(statement: ast.Import | ast.ImportFrom, name: str) -> str:
    alias = next(a for a in statement.names if (a.asname or a.name).split(".")[0] == name)
    suffix = f" as {alias.asname}" if alias.asname else ""
    if isinstance(statement, ast.Import):
        return f"import {alias.name}{suffix}"
    if statement.level:
        raise ValueError(f"relative import of {name!r} cannot be inlined")
    return f"from {statement.module} import {alias.name}{suffix}"
