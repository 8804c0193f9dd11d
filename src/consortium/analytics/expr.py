"""A small, safe expression language for cohort filters: ``where = "age >= 50 and sex == 'f'"``.

A filter arrives as text, possibly from another party, so it is *parsed, never run*: a hand-written
tokenizer and recursive-descent parser build a tree of the few node types below, and
:func:`evaluate` interprets that tree over pyarrow columns. Nothing here calls ``eval``, ``exec``,
``compile`` or ``ast.parse``; the grammar is small enough to audit in one sitting, it has no
names that resolve to Python objects, and a hand parser can say exactly where and why it refuses
a text ("calls are not allowed") where Python's parser would accept it and leave us to walk and
police a far larger tree.

Grammar (keywords are case-insensitive)::

    filter     := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | "(" or ")" | comparison
    comparison := operand ("==" | "!=" | "<" | "<=" | ">" | ">=") operand
                | column ["not"] "in" "[" literal ("," literal)* [","] "]"
                | column "is" ["not"] "missing"
                | column ["not"] "between" literal "and" literal
    operand    := column | literal
    column     := identifier | `back-quoted name`          (\\` and \\\\ escape inside)
    literal    := number | 'text' | "text" | true | false    (\\' \\" \\\\ escape inside)

Numbers are integers, decimals and exponents, optionally negative (``-1.5e3``). At least one side
of a comparison is a column. Refused, each with its own message: attribute access, calls,
subscripts, lambdas, statements (``;``), assignment (``=``), arithmetic, string prefixes such as
f-strings, names starting or ending with ``__`` (also back-quoted), a column alone without a
comparison, and texts over :data:`MAX_LENGTH` characters, :data:`MAX_DEPTH` levels of nesting or
:data:`MAX_NODES` nodes.

Missing values follow SQL's three-valued logic: a comparison with a missing value is *unknown*,
``not unknown`` is unknown, ``false and unknown`` is false, ``true or unknown`` is true, and a row
is kept only when the whole filter is *true*. So ``age > 50`` and ``not age > 50`` both drop a
row whose age is missing; ``age is missing`` asks for those rows explicitly.

Comparisons: a column whose present values are all numbers (a numeric Parquet column, or a CSV
column of numbers written as text, parsed with :func:`consortium.data._tables.numbers`) compares
numerically, also with a quoted number (``sex == '1'`` matches ``"1.0"``). A text column compares
its stripped values with text, case-sensitively (``<`` and ``>`` in code-point order, which suits
ISO dates); with a number it matches ``==``, ``!=`` and ``in`` on the values that are numbers and
refuses ``<``/``>``, naming the column and a value that is not a number. ``true``/``false`` are 1
and 0 for a numeric column and match ``true``/``false`` in any letter case in a text column.
"""

from __future__ import annotations

import abc
import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from consortium.data._tables import numbers
from consortium.errors import ConfigError, DataError, MissingExtraError

__all__ = [
    "MAX_DEPTH", "MAX_LENGTH", "MAX_NODES", "And", "Between", "Column", "Compare", "Expr", "In",
    "IsMissing", "Literal", "Not", "Or", "evaluate", "parse",
]

#: Longest filter text accepted, in characters.
MAX_LENGTH = 4096
#: Deepest nesting of parentheses and ``not`` accepted.
MAX_DEPTH = 50
#: Most nodes (conditions, columns, values) in one filter.
MAX_NODES = 500

_EXAMPLE = "e.g. age >= 50 and sex == 'female'"
_OPERATORS = ("==", "!=", "<", "<=", ">", ">=")
_FLIPPED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_KEYWORDS = frozenset({"and", "or", "not", "in", "is", "missing", "between", "true", "false"})
# Words that read as Python or SQL but mean nothing here; each gets a pointed refusal.
_RESERVED = {
    "null": "a missing value is tested with 'is missing', e.g. age is missing",
    "none": "a missing value is tested with 'is missing', e.g. age is missing",
    "nan": "a missing value is tested with 'is missing', e.g. age is missing",
    "lambda": "lambdas are Python code, not allowed in a filter",
    "import": "imports are Python code, not allowed in a filter",
}
_NAME = re.compile(r"[^\W\d]\w*")
_WORDISH = re.compile(r"[\w.]*")
_NUMBER = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SYMBOL_HINTS = {
    ";": "a filter is one condition, not statements",
    ":": "lambdas, slices and dictionaries are Python, not allowed in a filter",
    "+": "arithmetic is not allowed; compare a column with a value",
    "*": "arithmetic is not allowed; compare a column with a value",
    "/": "arithmetic is not allowed; compare a column with a value",
    "%": "arithmetic and %-formatting are not allowed",
    "&": "write 'and' to combine conditions",
    "|": "write 'or' to combine conditions",
    "~": "write 'not' to negate a condition",
    "^": "operators other than == != < <= > >= are not allowed",
    "@": "decorators and matrix products are Python, not allowed in a filter",
    "{": "sets, dictionaries and f-string fields are not allowed; a list is written [a, b]",
    "}": "sets, dictionaries and f-string fields are not allowed; a list is written [a, b]",
    "#": "comments are not allowed",
    "\\": "a backslash may only escape a quote or a backslash inside quotes",
}


# -- the tree ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A column of the site's table, by name."""

    name: str

    def __str__(self) -> str:
        if (_NAME.fullmatch(self.name) and self.name.lower() not in _KEYWORDS
                and self.name.lower() not in _RESERVED and not _dunder(self.name)):
            return self.name
        return "`" + self.name.replace("\\", "\\\\").replace("`", "\\`") + "`"


@dataclass(frozen=True)
class Literal:
    """A constant: a number, a text or a boolean."""

    value: bool | int | float | str

    def __str__(self) -> str:
        v = self.value
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


Operand = Column | Literal


class Expr(abc.ABC):
    """A parsed filter: a tree of conditions. :func:`parse` builds one, :func:`evaluate` applies
    it; ``str(expr)`` is its canonical text, which parses back to an equal tree. Every node
    kind below implements :attr:`columns`."""

    __slots__ = ()

    @property
    @abc.abstractmethod
    def columns(self) -> frozenset[str]:
        """The names of the columns the filter reads."""


@dataclass(frozen=True)
class Compare(Expr):
    """``left op right`` with ``op`` one of ``== != < <= > >=``."""

    op: str
    left: Operand
    right: Operand

    @property
    def columns(self) -> frozenset[str]:
        return frozenset(x.name for x in (self.left, self.right) if isinstance(x, Column))

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right}"


@dataclass(frozen=True)
class In(Expr):
    """``column in [values]``, or ``not in`` when ``negated``."""

    column: Column
    values: tuple[Literal, ...]
    negated: bool = False

    @property
    def columns(self) -> frozenset[str]:
        return frozenset({self.column.name})

    def __str__(self) -> str:
        word = "not in" if self.negated else "in"
        return f"{self.column} {word} [{', '.join(map(str, self.values))}]"


@dataclass(frozen=True)
class IsMissing(Expr):
    """``column is missing``, or ``is not missing`` when ``negated``."""

    column: Column
    negated: bool = False

    @property
    def columns(self) -> frozenset[str]:
        return frozenset({self.column.name})

    def __str__(self) -> str:
        return f"{self.column} is {'not ' if self.negated else ''}missing"


@dataclass(frozen=True)
class Between(Expr):
    """``low <= column <= high`` (``not between`` when ``negated``), bounds included."""

    column: Column
    low: Literal
    high: Literal
    negated: bool = False

    @property
    def columns(self) -> frozenset[str]:
        return frozenset({self.column.name})

    def __str__(self) -> str:
        word = "not between" if self.negated else "between"
        return f"{self.column} {word} {self.low} and {self.high}"


@dataclass(frozen=True)
class Not(Expr):
    """The negation of a condition (unknown stays unknown)."""

    part: Expr

    @property
    def columns(self) -> frozenset[str]:
        return self.part.columns

    def __str__(self) -> str:
        inner = f"({self.part})" if isinstance(self.part, (And, Or)) else str(self.part)
        return f"not {inner}"


@dataclass(frozen=True)
class And(Expr):
    """All of two or more conditions."""

    parts: tuple[Expr, ...]

    @property
    def columns(self) -> frozenset[str]:
        return frozenset().union(*(p.columns for p in self.parts))

    def __str__(self) -> str:
        return " and ".join(f"({p})" if isinstance(p, Or) else str(p) for p in self.parts)


@dataclass(frozen=True)
class Or(Expr):
    """Any of two or more conditions."""

    parts: tuple[Expr, ...]

    @property
    def columns(self) -> frozenset[str]:
        return frozenset().union(*(p.columns for p in self.parts))

    def __str__(self) -> str:
        return " or ".join(map(str, self.parts))


def _dunder(name: str) -> bool:
    return name.startswith("__") or name.endswith("__")


# -- tokens ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    kind: str  # name, keyword, number, string, op, punct, end
    text: str  # as written, for messages
    value: Any
    pos: int


class _Source:
    """The filter text, and errors that point into it."""

    def __init__(self, text: str, what: str) -> None:
        self.text = text
        self.what = what

    def fail(self, pos: int, problem: str, hint: str) -> NoReturn:
        line_start = self.text.rfind("\n", 0, pos) + 1
        line_end = self.text.find("\n", pos)
        line = self.text[line_start:] if line_end < 0 else self.text[line_start:line_end]
        column = pos - line_start + 1
        where = f"column {column}"
        if "\n" in self.text:
            where = f"line {self.text.count(chr(10), 0, pos) + 1}, {where}"
        # A window around the position keeps a 4,096-character filter's message readable.
        lo = max(0, column - 1 - 40)
        shown = line[lo:column - 1 + 40]
        shown = ("..." if lo else "") + shown + ("..." if len(line) > column + 39 else "")
        caret = " " * (column - 1 - lo + (3 if lo else 0)) + "^"
        raise ConfigError(f"{self.what}: {problem} at {where}: {hint}\n  {shown}\n  {caret}")


def _tokens(src: _Source) -> list[_Token]:
    text, pos, n = src.text, 0, len(src.text)
    out: list[_Token] = []
    while pos < n:
        ch = text[pos]
        if ch.isspace():
            pos += 1
        elif _NUMBER.match(text, pos):
            pos = _number(src, pos, out)
        elif ch == ".":
            src.fail(pos, "unexpected '.'", "attribute access is not allowed; a filter compares "
                     f"columns with values, {_EXAMPLE} (a column name with a dot is written in "
                     "back-quotes: `a.b`)")
        elif _NAME.match(text, pos):
            pos = _word(src, pos, out)
        elif ch in "'\"":
            pos = _string(src, pos, out)
        elif ch == "`":
            pos = _quoted_name(src, pos, out)
        elif text.startswith(("==", "!=", "<=", ">="), pos):
            out.append(_Token("op", text[pos:pos + 2], text[pos:pos + 2], pos))
            pos += 2
        elif ch in "<>":
            out.append(_Token("op", ch, ch, pos))
            pos += 1
        elif ch == "=":
            src.fail(pos, "unexpected '='", "'=' is assignment; compare with '==', "
                     "e.g. sex == 'female'")
        elif ch == "!":
            src.fail(pos, "unexpected '!'", "write 'not' to negate a condition, '!=' for "
                     "'not equal'")
        elif ch in "()[],-":
            out.append(_Token("punct", ch, ch, pos))
            pos += 1
        elif ch in _SYMBOL_HINTS:
            src.fail(pos, f"unexpected {ch!r}", _SYMBOL_HINTS[ch])
        else:
            src.fail(pos, f"unexpected character {ch!r}", "a filter holds column names, values, "
                     f"comparisons and the words and/or/not, {_EXAMPLE}")
    out.append(_Token("end", "end of the filter", None, n))
    return out


def _number(src: _Source, pos: int, out: list[_Token]) -> int:
    match = _NUMBER.match(src.text, pos)
    assert match is not None  # the caller matched it
    end = match.end()
    if end < len(src.text) and (src.text[end] == "." or _NAME.match(src.text, end)
                                or src.text[end].isdigit()):
        rest = _WORDISH.match(src.text, end)
        bad = src.text[pos:rest.end() if rest else end]
        src.fail(pos, f"malformed number {bad!r}", "write numbers as 50, "
                 "-1.5 or 1e3; a column name cannot start with a digit unless back-quoted")
    text = match.group()
    value: int | float
    if any(c in text for c in ".eE"):
        value = float(text)
    else:
        value = int(text)
    try:
        finite = math.isfinite(float(value))
    except OverflowError:
        finite = False
    if not finite:
        src.fail(pos, "number out of range", "numbers must be finite 64-bit floats")
    out.append(_Token("number", text, value, pos))
    return end


def _word(src: _Source, pos: int, out: list[_Token]) -> int:
    match = _NAME.match(src.text, pos)
    assert match is not None
    end, word = match.end(), match.group()
    if end < len(src.text) and src.text[end] in "'\"":
        src.fail(pos, f"unexpected string prefix {word!r}", "prefixed strings such as f-strings "
                 "are not allowed; write a plain 'text' or \"text\"")
    lower = word.lower()
    if _dunder(word):
        src.fail(pos, f"name {word!r} is not allowed", "names starting or ending with '__' are "
                 "refused (they reach Python internals); rename the column")
    if lower in _RESERVED:
        src.fail(pos, f"unexpected {word!r}", _RESERVED[lower])
    kind = "keyword" if lower in _KEYWORDS else "name"
    out.append(_Token(kind, word, lower if kind == "keyword" else word, pos))
    return end


def _string(src: _Source, pos: int, out: list[_Token]) -> int:
    quote, chars, i, n = src.text[pos], [], pos + 1, len(src.text)
    while i < n and src.text[i] != quote:
        ch = src.text[i]
        if ch == "\\":
            nxt = src.text[i + 1:i + 2]
            if nxt not in ("'", '"', "\\"):
                src.fail(i, "unknown escape " + repr("\\" + nxt), "inside quotes only \\' \\\" "
                         "and \\\\ are escapes")
            chars.append(nxt)
            i += 2
        else:
            chars.append(ch)
            i += 1
    if i >= n:
        src.fail(pos, "unterminated string", f"close it with {quote}")
    out.append(_Token("string", src.text[pos:i + 1], "".join(chars), pos))
    return i + 1


def _quoted_name(src: _Source, pos: int, out: list[_Token]) -> int:
    chars, i, n = [], pos + 1, len(src.text)
    while i < n and src.text[i] != "`":
        if src.text[i] == "\\" and src.text[i + 1:i + 2] in ("`", "\\"):
            i += 1
        chars.append(src.text[i])
        i += 1
    if i >= n:
        src.fail(pos, "unterminated column name", "close the back-quoted name with `")
    name = "".join(chars)
    if not name:
        src.fail(pos, "empty column name ``", "write the column's name between the back-quotes")
    if _dunder(name):
        src.fail(pos, f"name {name!r} is not allowed", "names starting or ending with '__' are "
                 "refused (they reach Python internals); rename the column")
    out.append(_Token("name", src.text[pos:i + 1], name, pos))
    return i + 1


# -- the parser --------------------------------------------------------------------------------


def parse(text: str, *, what: str = "where") -> Expr:
    """Parse a filter such as ``"age >= 50 and sex == 'female'"`` (grammar in the module doc).

    Args:
        text: the filter, at most :data:`MAX_LENGTH` characters.
        what: how error messages name the filter (its configuration key).

    Raises:
        ConfigError: the text is not a filter, or is refused as unsafe or too large; the message
            gives the line and column, what was expected, and a caret under the spot.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a text such as \"{_EXAMPLE[5:]}\", "
                          f"got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ConfigError(f"{what}: the filter is {len(text)} characters long, over the limit of "
                          f"{MAX_LENGTH} (MAX_LENGTH); shorten it, e.g. with 'in [...]' lists")
    return _Parser(_Source(text, what)).filter()


class _Parser:
    def __init__(self, src: _Source) -> None:
        self.src = src
        self.tokens = _tokens(src)
        self.i = 0
        self.depth = 0
        self.nodes = 0

    # helpers

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def next(self) -> _Token:
        tok = self.peek()
        self.i += 1
        return tok

    def at(self, kind: str, value: str | None = None) -> bool:
        tok = self.peek()
        return tok.kind == kind and (value is None or tok.value == value)

    def fail(self, tok: _Token, hint: str, problem: str | None = None) -> NoReturn:
        shown = "end of the filter" if tok.kind == "end" else repr(tok.text)
        self.src.fail(tok.pos, problem or f"unexpected {shown}", hint)

    def count(self, tok: _Token, n: int = 1) -> None:
        self.nodes += n
        if self.nodes > MAX_NODES:
            self.src.fail(tok.pos, f"more than {MAX_NODES} nodes", f"a filter holds at most "
                          f"{MAX_NODES} conditions, columns and values (MAX_NODES); simplify it")

    def enter(self, tok: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.src.fail(tok.pos, f"nesting deeper than {MAX_DEPTH} levels", "parentheses and "
                          f"'not' nest at most {MAX_DEPTH} deep (MAX_DEPTH); simplify the filter")

    # grammar

    def filter(self) -> Expr:
        if self.at("end"):
            self.src.fail(0, "empty filter", f"write a condition, {_EXAMPLE}")
        expr = self.disjunction()
        tok = self.peek()
        if tok.kind != "end":
            hint = "expected 'and', 'or' or the end of the filter"
            if tok.kind == "punct" and tok.text == ")":
                hint = "this ')' closes no '('"
            self.fail(tok, hint)
        return expr

    def disjunction(self) -> Expr:
        first = self.peek()
        parts = [self.conjunction()]
        while self.at("keyword", "or"):
            self.next()
            parts.append(self.conjunction())
        if len(parts) == 1:
            return parts[0]
        self.count(first)
        return Or(_flat(Or, parts))

    def conjunction(self) -> Expr:
        first = self.peek()
        parts = [self.negation()]
        while self.at("keyword", "and"):
            self.next()
            parts.append(self.negation())
        if len(parts) == 1:
            return parts[0]
        self.count(first)
        return And(_flat(And, parts))

    def negation(self) -> Expr:
        tok = self.peek()
        if self.at("keyword", "not"):
            self.next()
            self.enter(tok)
            self.count(tok)
            part = self.negation()
            self.depth -= 1
            return Not(part)
        if self.at("punct", "("):
            self.next()
            self.enter(tok)
            inner = self.disjunction()
            if not self.at("punct", ")"):
                self.fail(self.peek(), f"expected ')' to close the '(' at column {tok.pos + 1}, "
                          "or 'and' / 'or'")
            self.next()
            self.depth -= 1
            if self.at("op"):
                self.fail(self.peek(), "parentheses group conditions, not values; compare a "
                          "column directly, e.g. age > 50")
            return inner
        return self.comparison()

    def comparison(self) -> Expr:
        start = self.peek()
        left = self.operand()
        tok = self.peek()
        if tok.kind == "op":
            self.next()
            right = self.operand()
            if isinstance(left, Literal) and isinstance(right, Literal):
                self.fail(tok, "one side of a comparison must be a column",
                          f"{tok.text!r} compares two values")
            if self.at("op"):
                self.fail(self.peek(), "chained comparisons are not allowed; write "
                          "'x between 1 and 5' or '1 < x and x < 5'")
            self.count(start)
            return Compare(tok.text, left, right)
        negated = False
        if tok.kind == "keyword" and tok.value == "not":
            self.next()
            negated = True
            tok = self.peek()
            if not (tok.kind == "keyword" and tok.value in ("in", "between")):
                self.fail(tok, "expected 'in' or 'between' after 'not'; to negate a condition "
                          "put 'not' before it, e.g. not age > 50")
        if tok.kind == "keyword" and tok.value in ("in", "between", "is"):
            column = self.subject(left, tok)
            self.next()
            self.count(start)
            if tok.value == "in":
                return In(column, self.values(), negated)
            if tok.value == "between":
                low = self.value("a value after 'between', e.g. age between 40 and 60")
                if not self.at("keyword", "and"):
                    self.fail(self.peek(), "expected 'and' between the bounds, e.g. age between "
                              "40 and 60")
                self.next()
                high = self.value("a value after 'and', e.g. age between 40 and 60")
                return Between(column, low, high, negated)
            if self.at("keyword", "not"):
                self.next()
                negated = True
            if not self.at("keyword", "missing"):
                self.fail(self.peek(), "expected 'missing' or 'not missing' after 'is'; compare "
                          "values with '==', e.g. sex == 'female'")
            self.next()
            return IsMissing(column, negated)
        if tok.kind == "punct" and tok.text == "-":
            self.fail(tok, "arithmetic is not allowed; compare a column with a value, e.g. "
                      "age > 50")
        what = f"the column {str(left)!r}" if isinstance(left, Column) else f"the value {left}"
        self.fail(tok, f"a filter needs a comparison: {what} alone is not a condition; write "
                  "it with == != < <= > >=, in [...], is missing or between, e.g. age >= 50",
                  f"expected a comparison after {left}, found "
                  f"{'the end of the filter' if tok.kind == 'end' else repr(tok.text)}")

    def subject(self, left: Operand, tok: _Token) -> Column:
        if not isinstance(left, Column):
            self.fail(tok, f"the left side of {tok.value!r} must be a column, e.g. sex in "
                      "['F', 'M']")
        return left

    def operand(self) -> Operand:
        tok = self.next()
        self.count(tok)
        if tok.kind == "name":
            nxt = self.peek()
            if nxt.kind == "punct" and nxt.text == "(":
                self.fail(nxt, f"calls are not allowed ({tok.text}(...) looks like a function "
                          f"call); a filter compares columns with values, {_EXAMPLE}")
            if nxt.kind == "punct" and nxt.text == "[":
                self.fail(nxt, "subscripts are not allowed; a list of values may only follow "
                          "'in', e.g. sex in ['F', 'M']")
            return Column(tok.value)
        if tok.kind in ("number", "string"):
            return Literal(tok.value)
        if tok.kind == "keyword" and tok.value in ("true", "false"):
            return Literal(tok.value == "true")
        if tok.kind == "punct" and tok.text == "-":
            if self.at("number"):
                return Literal(-self.next().value)
            self.fail(tok, "arithmetic is not allowed; '-' may only start a negative number, "
                      "e.g. x > -1.5")
        if tok.kind == "keyword" and tok.value == "missing":
            self.fail(tok, "a missing value is tested with 'is missing', e.g. age is missing")
        if tok.kind == "punct" and tok.text == "(":
            self.fail(tok, "parentheses group conditions, not values; write e.g. age > 50")
        if tok.kind == "punct" and tok.text == "[":
            self.fail(tok, "a list of values may only follow 'in', e.g. sex in ['F', 'M']")
        self.fail(tok, f"expected a column name or a value, {_EXAMPLE}")

    def value(self, expected: str) -> Literal:
        tok = self.peek()
        operand = self.operand()
        if not isinstance(operand, Literal):
            self.fail(tok, f"expected {expected}; a column name here is not allowed (quote "
                      "text: 'F')")
        return operand

    def values(self) -> tuple[Literal, ...]:
        if not self.at("punct", "["):
            self.fail(self.peek(), "expected '[' to start the list after 'in', e.g. sex in "
                      "['F', 'M']")
        self.next()
        if self.at("punct", "]"):
            self.fail(self.peek(), "the list after 'in' is empty; give at least one value")
        out = [self.value("a value in the list, e.g. sex in ['F', 'M']")]
        while self.at("punct", ","):
            self.next()
            if self.at("punct", "]"):
                break
            out.append(self.value("a value in the list, e.g. sex in ['F', 'M']"))
        if not self.at("punct", "]"):
            self.fail(self.peek(), "expected ',' or ']' in the list, e.g. sex in ['F', 'M']")
        self.next()
        return tuple(out)


def _flat(kind: type[And] | type[Or], parts: list[Expr]) -> tuple[Expr, ...]:
    """``a or (b or c)`` is ``a or b or c``: one canonical tree for each text."""
    out: list[Expr] = []
    for p in parts:
        out.extend(p.parts if isinstance(p, kind) else (p,))
    return tuple(out)


# -- evaluation --------------------------------------------------------------------------------

# A condition's value on every row as two masks: (true, false); rows in neither are unknown.
_Truth = tuple[np.ndarray, np.ndarray]

_NUMPY_OPS: dict[str, Callable[[Any, Any], np.ndarray]] = {
    "==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal,
    ">": np.greater, ">=": np.greater_equal,
}
_ARROW_OPS = {"==": "equal", "!=": "not_equal", "<": "less", "<=": "less_equal",
              ">": "greater", ">=": "greater_equal"}


def evaluate(expr: Expr, columns: Mapping[str, Any], rows: int, *,
             what: str = "where") -> np.ndarray:
    """Which rows satisfy ``expr``: a boolean array of length ``rows``.

    Vectorised over whole columns (numpy and ``pyarrow.compute``); Python runs per distinct value
    only where a text column is matched against a number. Missing values (null, NaN, blank text)
    make a comparison unknown, and a row is kept only when the filter is true (SQL's
    three-valued logic; see the module doc).

    Args:
        expr: a filter from :func:`parse`.
        columns: pyarrow arrays by column name, as in ``consortium.data._tables.Table.columns``.
        rows: the number of rows (every column used must have this length).
        what: how error messages name the filter.

    Raises:
        DataError: the filter names a column that is not there (the message lists the columns),
            or orders (``<``, ``>``, ``between``) a column holding text against a number, or a
            numeric column against text; the message names the column and an offending value.
    """
    try:
        import pyarrow as pa
        import pyarrow.compute  # pa.compute
    except ImportError:
        raise MissingExtraError("filtering rows", "parquet", "pyarrow") from None
    unknown = sorted(expr.columns - set(columns))
    if unknown:
        near = [m for u in unknown for m in difflib.get_close_matches(u, list(columns), 1)]
        raise DataError(
            f"{what}: unknown column{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; the data have {sorted(columns)}"
            + (f" (did you mean {', '.join(map(repr, near))}?)" if near else "")
        )
    return _Evaluation(pa, columns, rows, what).truth(expr)[0]


class _View:
    """One column seen as numbers (when every present value is one) or as stripped text."""

    def __init__(self, pa: Any, name: str, array: Any, rows: int, what: str) -> None:
        self.pa, self.name, self.what = pa, name, what
        pc = pa.compute
        if hasattr(array, "combine_chunks"):
            array = array.combine_chunks()
        if len(array) != rows:
            raise DataError(f"{what}: column {name!r} has {len(array)} rows, expected {rows}")
        self.text: Any = None
        kind = array.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            stripped = pc.utf8_trim_whitespace(array)
            self.text = pc.if_else(pc.equal(stripped, ""), pa.scalar(None, kind), stripped)
            self.numeric = numbers(self.text)
        else:
            self.numeric = numbers(array)
            if self.numeric is None:
                try:
                    self.text = pc.cast(array, pa.string())
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise DataError(f"{what}: column {name!r} has type {kind}, which a filter "
                                    "cannot compare; filter on a number or text column") from None
        if self.numeric is not None:
            self.missing = np.isnan(self.numeric)
        else:
            self.missing = np.asarray(self.text.is_null().to_numpy(zero_copy_only=False))
        self._loose: tuple[np.ndarray, str | None] | None = None

    def loose(self) -> tuple[np.ndarray, str | None]:
        """A text column's values that are numbers (NaN elsewhere), and a value that is not a
        number (for messages); computed per distinct value."""
        if self._loose is None:
            pc = self.pa.compute
            encoded = pc.dictionary_encode(self.text)
            parsed, sample = [], None
            for v in encoded.dictionary.to_pylist():
                x = _as_number(v)
                if x is None and sample is None:
                    sample = v
                parsed.append(np.nan if x is None else x)
            lookup = np.append(np.asarray(parsed, dtype=np.float64), np.nan)
            idx = pc.fill_null(encoded.indices.cast(self.pa.int64()), -1)
            self._loose = (lookup[np.asarray(idx.to_numpy(zero_copy_only=False))], sample)
        return self._loose

    def refuse_order(self, shown: str) -> NoReturn:
        sample = self.loose()[1]
        raise DataError(
            f'{self.what}: column {self.name!r} holds text (such as {sample!r}), so "{shown}" '
            "cannot order it against a number; use == or in for text values, or map them to "
            "numbers in harmonize.toml"
        )


class _Evaluation:
    def __init__(self, pa: Any, columns: Mapping[str, Any], rows: int, what: str) -> None:
        self.pa, self.columns, self.rows, self.what = pa, columns, rows, what
        self.views: dict[str, _View] = {}

    def view(self, column: Column) -> _View:
        if column.name not in self.views:
            self.views[column.name] = _View(self.pa, column.name, self.columns[column.name],
                                            self.rows, self.what)
        return self.views[column.name]

    def truth(self, expr: Expr) -> _Truth:
        if isinstance(expr, Not):
            true, false = self.truth(expr.part)
            return false, true
        if isinstance(expr, (And, Or)):
            # Kleene logic: `and` is true when all parts are, false when any is; `or` dually.
            conj = isinstance(expr, And)
            true, false = self.truth(expr.parts[0])
            true, false = true.copy(), false.copy()
            for part in expr.parts[1:]:
                t, f = self.truth(part)
                if conj:
                    true &= t
                    false |= f
                else:
                    true |= t
                    false &= f
            return true, false
        if isinstance(expr, IsMissing):
            missing = self.view(expr.column).missing
            return (~missing, missing.copy()) if expr.negated else (missing.copy(), ~missing)
        if isinstance(expr, In):
            hit = self.member(self.view(expr.column), expr.values)
            present = ~self.view(expr.column).missing
            true, false = present & hit, present & ~hit
            return (false, true) if expr.negated else (true, false)
        if isinstance(expr, Between):
            c = expr.column
            both = And((Compare(">=", c, expr.low), Compare("<=", c, expr.high)))
            true, false = self.truth(both)
            return (false, true) if expr.negated else (true, false)
        if isinstance(expr, Compare):
            return self.compare(expr)
        raise TypeError(f"not a filter node: {expr!r}")

    def compare(self, expr: Compare) -> _Truth:
        op, left, right = expr.op, expr.left, expr.right
        if isinstance(left, Literal):
            op, left, right = _FLIPPED[op], right, left
        if not isinstance(left, Column):
            raise DataError(f'{self.what}: "{expr}" compares two values; one side must be a '
                            "column")
        a = self.view(left)
        if isinstance(right, Column):
            return self.columns_compare(op, a, self.view(right), str(expr))
        return self.value_compare(op, a, right.value, str(expr))

    def value_compare(self, op: str, a: _View, value: Any, shown: str) -> _Truth:
        ordering = op not in ("==", "!=")
        number = _as_number(value)
        if a.numeric is not None:
            if number is None:
                if ordering:
                    raise DataError(f'{self.what}: column {a.name!r} holds numbers, so "{shown}" '
                                    f"needs a number, not {value!r}")
                present = ~a.missing
                return (present.copy(), np.zeros_like(present)) if op == "!=" else \
                    (np.zeros_like(present), present.copy())
            return _numeric(op, a.numeric, number)
        pc = self.pa.compute
        if isinstance(value, str):
            return self.arrow(op, a.text, value.strip())
        if ordering:
            a.refuse_order(shown)
        if isinstance(value, bool):
            return self.arrow(op, pc.utf8_lower(a.text), "true" if value else "false")
        return self.loose_equal(op, a, number)

    def columns_compare(self, op: str, a: _View, b: _View, shown: str) -> _Truth:
        if a.numeric is not None and b.numeric is not None:
            return _numeric(op, a.numeric, b.numeric)
        if a.numeric is None and b.numeric is None:
            return self.arrow(op, a.text, b.text)
        text, num = (a, b) if a.numeric is None else (b, a)
        if op not in ("==", "!="):
            text.refuse_order(shown)
        return self.loose_equal(op, text, num.numeric)

    def loose_equal(self, op: str, text: _View, other: Any) -> _Truth:
        """``==``/``!=`` of a text column with numbers: values that are not numbers differ."""
        values = text.loose()[0]
        present = ~text.missing & ~np.isnan(other)
        with np.errstate(invalid="ignore"):
            equal = present & (values == other)
        return (present & ~equal, equal) if op == "!=" else (equal, present & ~equal)

    def arrow(self, op: str, a: Any, b: Any) -> _Truth:
        pc = self.pa.compute
        result = getattr(pc, _ARROW_OPS[op])(a, b)
        known = np.asarray(result.is_valid().to_numpy(zero_copy_only=False))
        true = np.asarray(pc.fill_null(result, False).to_numpy(zero_copy_only=False))
        return true, known & ~true

    def member(self, a: _View, values: tuple[Literal, ...]) -> np.ndarray:
        if a.numeric is not None:
            targets = [x for v in values if (x := _as_number(v.value)) is not None]
            return np.isin(a.numeric, np.asarray(targets, dtype=np.float64))
        pa, pc = self.pa, self.pa.compute
        hit = np.zeros(self.rows, dtype=bool)
        texts = [v.value.strip() for v in values if isinstance(v.value, str)]
        if texts:
            found = pc.is_in(a.text, value_set=pa.array(texts, pa.string()))
            hit |= np.asarray(pc.fill_null(found, False).to_numpy(zero_copy_only=False))
        flags = ["true" if v.value else "false" for v in values if isinstance(v.value, bool)]
        if flags:
            found = pc.is_in(pc.utf8_lower(a.text), value_set=pa.array(flags, pa.string()))
            hit |= np.asarray(pc.fill_null(found, False).to_numpy(zero_copy_only=False))
        nums = [float(v.value) for v in values if isinstance(v.value, (int, float))
                and not isinstance(v.value, bool)]
        if nums:
            hit |= np.isin(a.loose()[0], np.asarray(nums, dtype=np.float64))
        return hit


def _numeric(op: str, a: np.ndarray, b: Any) -> _Truth:
    known = ~np.isnan(a) & ~np.isnan(b)
    with np.errstate(invalid="ignore"):
        hit = _NUMPY_OPS[op](a, b)
    return known & hit, known & ~hit


def _as_number(value: Any) -> float | None:
    """A literal or a text value as a number: booleans are 1 and 0, text is parsed as Python's
    ``float`` parses it; ``None`` when it is not a number (or is NaN)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        try:
            x = float(value)
        except OverflowError:
            return None
    else:
        try:
            x = float(str(value).strip())
        except ValueError:
            return None
    return None if math.isnan(x) else x
