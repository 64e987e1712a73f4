"""Rewrite one file's imports of a vendored ``sync_batchnorm`` into imports of ``autosyncbn``.

This is the libcst half of ``python -m autosyncbn migrate`` (see ``migrate.py``
for the command and the rules). libcst parses a file into a concrete syntax
tree that prints back byte for byte, so everything this module does not touch
(comments, blank lines, parentheses, the order of names) stays as it was and
the diff shows only the imports that changed. It needs the optional ``libcst``
package, so only ``migrate.main`` imports it, after checking libcst is there.

Where an import points is not decided here: the caller passes ``locate``,
which knows the file's location and the vendored folders.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import libcst as cst
from libcst.helpers import get_full_name_for_node
from libcst.metadata import ParentNodeProvider, PositionProvider, ScopeProvider

import autosyncbn

#: Where ``from <level dots><dotted parts> import ...`` points inside a vendored
#: folder (a path that may not exist, e.g. a class name under a module), or None
#: when it points elsewhere.
Locate = Callable[[int, "tuple[str, ...]"], Optional[Path]]

#: A rewritten import may only bring names autosyncbn really has.
EQUIVALENTS = frozenset(autosyncbn.__all__)

#: Raised for a file libcst cannot parse (Python 2 code, a syntax error).
ParseError = cst.ParserSyntaxError

_TARGET = "autosyncbn"


@dataclass(frozen=True, order=True)
class Issue:
    """Something left for the user: the line it is on, and why."""

    line: int
    message: str


@dataclass
class Rewrite:
    """One file before and after, and what could not be migrated in it."""

    old: str
    new: str
    old_bytes: bytes  # the file as read: writing checks it has not changed since
    new_bytes: bytes  # in the file's own encoding, ready to write
    issues: "list[Issue]" = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.old != self.new


def rewrite_imports(source: bytes, locate: Locate) -> Rewrite:
    """Rewrite every import that ``locate`` places in a vendored folder; raises ParseError."""
    module = cst.parse_module(source)
    rewriter = _ImportRewriter(locate)
    new_module = cst.MetadataWrapper(module).visit(rewriter)
    return Rewrite(module.code, new_module.code, source, new_module.bytes, sorted(rewriter.issues))


def _dotted(node: cst.BaseExpression) -> "tuple[str, ...]":
    return tuple((get_full_name_for_node(node) or "").split("."))


def _is_module(path: Path) -> bool:
    """A package folder or a ``.py`` file: ``from P import name`` then imports a module, not a name."""
    return path.is_dir() or path.with_name(path.name + ".py").is_file()


def _module_alias(bound: str) -> cst.Import:
    """``import autosyncbn as <bound>``: the name the code uses keeps working."""
    return cst.Import(names=[cst.ImportAlias(name=cst.Name(_TARGET), asname=cst.AsName(name=cst.Name(bound)))])


def _closing(own: cst.BaseParenthesizableWhitespace, closing: cst.BaseParenthesizableWhitespace
             ) -> cst.BaseParenthesizableWhitespace:
    """The layout after a new last name: its own end-of-line comment, then the original closing line."""
    if not isinstance(closing, cst.ParenthesizedWhitespace):
        return closing
    first_line = own.first_line if isinstance(own, cst.ParenthesizedWhitespace) else cst.TrailingWhitespace()
    return closing.with_changes(first_line=first_line)


def _with_names(node: cst.ImportFrom, aliases: "Sequence[cst.ImportAlias]") -> cst.ImportFrom:
    """``node`` importing only ``aliases`` (some of its names, in order), closed as the original was.

    The last name's comma carries the layout up to the closing parenthesis (or
    the closing parenthesis does, without a trailing comma): a new last name
    takes that layout and keeps its own comment.
    """
    aliases = list(aliases)
    last, original_last = aliases[-1], cst.ensure_type(node.names, Sequence)[-1]  # type: ignore[type-abstract]
    if last is original_last:
        return node.with_changes(names=aliases)
    own = last.comma.whitespace_after if isinstance(last.comma, cst.Comma) else cst.SimpleWhitespace("")
    rpar = node.rpar
    if node.lpar is None:  # `from x import a,` would be a syntax error
        last = last.with_changes(comma=cst.MaybeSentinel.DEFAULT)
    elif isinstance(original_last.comma, cst.Comma):  # a trailing comma
        last = last.with_changes(comma=original_last.comma.with_changes(
            whitespace_after=_closing(own, original_last.comma.whitespace_after)))
    elif rpar is not None:
        last = last.with_changes(comma=cst.MaybeSentinel.DEFAULT)
        rpar = rpar.with_changes(whitespace_before=_closing(own, rpar.whitespace_before))
    return node.with_changes(names=[*aliases[:-1], last], rpar=rpar)


class _ImportRewriter(cst.CSTTransformer):
    """Rewrites imports in place; a partly migratable ``from`` import becomes two statements."""

    METADATA_DEPENDENCIES = (PositionProvider, ScopeProvider, ParentNodeProvider)

    def __init__(self, locate: Locate) -> None:
        super().__init__()
        self.locate = locate
        self.issues: "list[Issue]" = []

    def _line(self, node: cst.CSTNode) -> int:
        return self.get_metadata(PositionProvider, node).start.line

    def _report(self, node: cst.CSTNode, message: str) -> None:
        self.issues.append(Issue(self._line(node), message))

    def _module_object_problems(self, statement: cst.CSTNode, alias: cst.ImportAlias, bound: str) -> bool:
        """Report each use of the module bound by ``alias`` that ``import autosyncbn as <bound>`` would break.

        Only ``<bound>.NAME`` with NAME in autosyncbn is safe. libcst's scope
        analysis finds the uses of this very import (not of a shadowing name).
        """
        scope = self.get_metadata(ScopeProvider, alias, None)
        if scope is None:
            return False
        found = False
        for assignment in scope.assignments[bound]:
            if getattr(assignment, "node", None) is not statement:
                continue
            for access in assignment.references:
                use = access.node
                parent = self.get_metadata(ParentNodeProvider, use, None)
                if isinstance(use, cst.Name) and isinstance(parent, cst.Attribute) and parent.value is use:
                    if parent.attr.value in EQUIVALENTS:
                        continue
                    why = f"{bound}.{parent.attr.value}: no autosyncbn equivalent"
                else:
                    why = f"{bound} is used other than as {bound}.NAME: cannot be rewritten safely"
                self._report(use, f"{why} (its import on line {self._line(alias)} was left as it is)")
                found = True
        return found

    def leave_Import(self, original_node: cst.Import, updated_node: cst.Import) -> cst.Import:
        names = []
        for original, alias in zip(original_node.names, updated_node.names):
            parts = _dotted(alias.name)
            if self.locate(0, parts) is None:
                names.append(alias)
            elif alias.asname is None and len(parts) > 1:
                dotted = ".".join(parts)
                self._report(original, f"import {dotted} binds {parts[0]}, used as {dotted}.NAME: cannot be "
                                       f"rewritten safely; import the names from autosyncbn instead")
                names.append(alias)
            else:
                bound = cst.ensure_type(alias.asname.name, cst.Name).value if alias.asname else parts[0]
                if self._module_object_problems(original_node, original, bound):
                    names.append(alias)
                else:
                    names.append(alias.with_changes(name=cst.Name(_TARGET),
                                                    asname=alias.asname or cst.AsName(name=cst.Name(bound))))
        return updated_node.with_changes(names=names)

    def leave_ImportFrom(self, original_node: cst.ImportFrom, updated_node: cst.ImportFrom
                         ) -> "Union[cst.ImportFrom, cst.FlattenSentinel[cst.BaseSmallStatement]]":
        level = len(updated_node.relative)
        parts = _dotted(updated_node.module) if updated_node.module else ()
        origin = "." * level + ".".join(parts)
        if isinstance(updated_node.names, cst.ImportStar):
            if self.locate(level, parts) is not None:
                self._report(original_node, f"from {origin} import *: the names it brings cannot be checked; "
                                            f"import the ones you use from autosyncbn")
            return updated_node
        names, modules, kept = [], [], []  # from autosyncbn import ..., import autosyncbn as ..., left as is
        # original_node's names are no star either: updated_node is original_node with its children's changes
        for original, alias in zip(original_node.names, updated_node.names):  # type: ignore[arg-type]
            name = cst.ensure_type(alias.name, cst.Name).value
            bound = cst.ensure_type(alias.asname.name, cst.Name).value if alias.asname else name
            submodule = self.locate(level, (*parts, name))
            if submodule is not None and _is_module(submodule):  # e.g. `from modeling import sync_batchnorm`
                if self._module_object_problems(original_node, original, bound):
                    kept.append(alias)
                else:
                    modules.append(bound)
            elif self.locate(level, parts) is None:
                kept.append(alias)
            elif name in EQUIVALENTS:
                names.append(alias)
            else:
                self._report(original, f"{name} (from {origin}): no autosyncbn equivalent; "
                                       f"this name was left importing from the vendored copy")
                kept.append(alias)
        if not names and not modules:
            return updated_node
        if not kept and not modules:  # the common case: only the module changes, formatting stays
            return updated_node.with_changes(relative=(), module=cst.Name(_TARGET))
        statements: "list[cst.BaseSmallStatement]" = []
        if names:
            statements.append(_with_names(updated_node, names).with_changes(relative=(), module=cst.Name(_TARGET)))
        statements.extend(_module_alias(bound) for bound in modules)
        if kept:
            statements.append(_with_names(updated_node, kept))
        return cst.FlattenSentinel(statements)

    def leave_SimpleStatementLine(self, original_node: cst.SimpleStatementLine,
                                  updated_node: cst.SimpleStatementLine
                                  ) -> "Union[cst.SimpleStatementLine, cst.FlattenSentinel[cst.SimpleStatementLine]]":
        """A split import on a line of its own becomes one line per statement, not ``a; b``."""
        if len(original_node.body) != 1 or len(updated_node.body) == 1:
            return updated_node
        first, *rest = updated_node.body
        return cst.FlattenSentinel([updated_node.with_changes(body=[first]),
                                    *(cst.SimpleStatementLine(body=[statement]) for statement in rest)])
