"""The cohort-filter language: parsing, canonical text, evaluation with missing values, and
refusal of everything that is not a filter (issue 15)."""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("hypothesis")

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from consortium.analytics.expr import (
    MAX_DEPTH,
    MAX_LENGTH,
    MAX_NODES,
    And,
    Between,
    Column,
    Compare,
    Expr,
    In,
    IsMissing,
    Literal,
    Not,
    Or,
    evaluate,
    parse,
)
from consortium.errors import ConfigError, DataError

# -- parsing -----------------------------------------------------------------------------------

FILTERS = [
    "age >= 50 and sex == 'female'",
    "AGE >= 50 AND Sex == 'female'",
    "not (a > 1 or b < -2.5e3) and c in ['x', \"y\\\"z\", 1, true]",
    "`blood pressure` between 100 and 140",
    "`blood pressure` not between 100 and 140",
    "x is not missing or y not in [1, 2,]",
    "x IS MISSING",
    "A == 1 or not b == 2 and c != 'q'",
    "5 < age",
    "a == b",
    "(a == 1 or (b == 2 or c == 3)) and d == 4",
    "a == 1 and (b == 2 and (c == 3))",
    "x == .5 or x == 5. or x == 1E-3 or x == -0.0",
    "not not x == 1",
    "not (x == 1)",
    "x not between -1 and 2 and y == 3",
    "`and` == 1 or `a-b` == 2 or `missing` is missing",
    "`a\\`b\\\\c` == 'it\\'s \\\\ \"ok\"'",
    "âge > 3 and 名前 == '名'",
    "t == 'a\nb' or\n  u == false",
    "x in [-1, 2.5, 'x', false]",
    "x between 'a' and 'm'",
]


@pytest.mark.parametrize("text", FILTERS)
def test_canonical_text_parses_back_to_the_same_tree(text: str) -> None:
    expr = parse(text)
    again = parse(str(expr))
    assert again == expr
    assert str(again) == str(expr)


def test_the_tree_follows_precedence_and_flattens() -> None:
    e = parse("a == 1 or b == 2 and not c == 3 or (d == 4 or e == 5)")
    a, b, c, d, e_ = (Compare("==", Column(n), Literal(v)) for n, v in zip("abcde", range(1, 6)))
    assert e == Or((a, And((b, Not(c))), d, e_))
    assert str(e) == "a == 1 or b == 2 and not c == 3 or d == 4 or e == 5"
    assert str(parse("(a == 1 or b == 2) and c == 3")) == "(a == 1 or b == 2) and c == 3"
    assert str(parse("not (a == 1 and b == 2)")) == "not (a == 1 and b == 2)"


def test_literals() -> None:
    def value(text: str) -> Any:
        node = parse(f"x == {text}")
        assert isinstance(node, Compare) and isinstance(node.right, Literal)
        return node.right.value

    assert value("50") == 50 and isinstance(value("50"), int)
    assert value("-7") == -7
    assert value("1e3") == 1000.0 and isinstance(value("1e3"), float)
    assert value(".5") == 0.5
    assert value("-2.5E-2") == -0.025
    assert value("'it\\'s'") == "it's"
    assert value('"say \\"hi\\""') == 'say "hi"'
    assert value("'a\\\\b'") == "a\\b"
    assert value("TRUE") is True and value("False") is False


def test_columns_lists_what_the_filter_reads() -> None:
    expr = parse("age >= 50 and (sex == 'f' or `blood pressure` between 1 and 2) and a == b "
                 "and not z is missing and q in [1]")
    assert expr.columns == frozenset({"age", "sex", "blood pressure", "a", "b", "z", "q"})
    assert parse("50 < age").columns == frozenset({"age"})


# Random canonical trees: And/Or never directly inside themselves (parsing flattens those).
_names = st.one_of(
    st.sampled_from(["age", "sex", "x_1", "and", "Missing", "a b", "a-b", "a.b", "x`y", "c\\d"]),
    st.text(min_size=1, max_size=8).filter(lambda s: not (s.startswith("__") or s.endswith("__"))),
)
_literals = st.one_of(
    st.booleans(), st.integers(-10**6, 10**6),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
).map(Literal)
_columns = _names.map(Column)
_leaves = st.one_of(
    st.builds(Compare, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), _columns,
              st.one_of(_columns, _literals)),
    st.builds(Compare, st.sampled_from(["==", "<"]), _literals, _columns),
    st.builds(In, _columns, st.lists(_literals, min_size=1, max_size=3).map(tuple), st.booleans()),
    st.builds(IsMissing, _columns, st.booleans()),
    st.builds(Between, _columns, _literals, _literals, st.booleans()),
)


def _junction(kind: type[And] | type[Or], parts: st.SearchStrategy[Expr]) -> Any:
    return st.lists(parts.filter(lambda p: not isinstance(p, kind)), min_size=2, max_size=3) \
        .map(lambda ps: kind(tuple(ps)))


_trees = st.recursive(
    _leaves,
    lambda inner: st.one_of(inner.map(Not), _junction(And, inner), _junction(Or, inner)),
    max_leaves=12,
)


@settings(max_examples=120, deadline=None)
@given(_trees)
def test_random_trees_round_trip_through_their_text(expr: Expr) -> None:
    text = str(expr)
    assert parse(text) == expr
    assert str(parse(text)) == text


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60) | st.builds(
    lambda t, i, junk: t[:i] + junk + t[i:],
    st.sampled_from(FILTERS), st.integers(0, 60), st.text(max_size=4)))
def test_any_text_parses_or_raises_a_config_error(text: str) -> None:
    try:
        expr = parse(text)
    except ConfigError as exc:
        assert str(exc).startswith("where: ")
        return
    assert parse(str(expr)) == expr


# -- refusals ----------------------------------------------------------------------------------

ESCAPES = [
    ("__import__('os').system('x')", "'__import__' is not allowed"),
    ("().__class__.__bases__[0].__subclasses__()", "attribute access is not allowed"),
    ("open('/etc/passwd')", "calls are not allowed"),
    ("lambda: 0", "lambdas are Python code"),
    ("a; import os", "not statements"),
    ("import os", "imports are Python code"),
    ("eval('1')", "calls are not allowed"),
    ("exec", "a filter needs a comparison"),
    ("exec('x = 1')", "calls are not allowed"),
    ("getattr(a, 'b')", "calls are not allowed"),
    ("a.b == 1", "attribute access is not allowed"),
    ("a[0] == 1", "subscripts are not allowed"),
    ('f"{a}" == 1', "f-strings are not allowed"),
    ("x == f'{__import__(\"os\")}'", "f-strings are not allowed"),
    ("`__class__` == 1", "'__class__' is not allowed"),
    ("x == 1 or __builtins__ == 2", "'__builtins__' is not allowed"),
    ("x = 1", "'=' is assignment"),
    ("x := 1", "lambdas, slices and dictionaries"),
    ("x + 1 > 2", "arithmetic is not allowed"),
    ("x - 1 > 2", "arithmetic is not allowed"),
    ("x > -y", "arithmetic is not allowed"),
    ("x == {1}", "sets, dictionaries"),
    ("x == 1 # comment", "comments are not allowed"),
    ("x == 1 && y == 2", "write 'and'"),
    ("!x", "write 'not'"),
    ("age", "a filter needs a comparison"),
    ("'text'", "a filter needs a comparison"),
    ("1 == 1", "one side of a comparison must be a column"),
    ("1 < x < 5", "chained comparisons are not allowed"),
    ("x in (1, 2)", "expected '['"),
    ("x in []", "is empty"),
    ("x in [y]", "a column name here is not allowed"),
    ("x is 5", "expected 'missing'"),
    ("x == None", "is missing"),
    ("x == null", "is missing"),
    ("(x) > 5", "a filter needs a comparison"),
    ("x > (5)", "parentheses group conditions, not values"),
    ("(x == 1) == true", "parentheses group conditions, not values"),
    ("x == 'a", "unterminated string"),
    ("x == 'a\\n'", "unknown escape"),
    ("x == 1e999", "number out of range"),
    ("x == 1.2.3", "malformed number '1.2.3'"),
    ("(x == 1", "expected ')'"),
    ("x == 1)", "closes no '('"),
    ("x == 1 y == 2", "expected 'and', 'or'"),
    ("", "empty filter"),
    ("   ", "empty filter"),
    ("x == \x00", "unexpected character"),
]


@pytest.mark.parametrize(("text", "fragment"), ESCAPES)
def test_unsafe_or_malformed_filters_are_refused_clearly(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith("where: ")
    assert fragment in message, message
    assert "column " in message and "^" in message  # a position and a caret


def test_the_error_points_at_the_offending_character() -> None:
    with pytest.raises(ConfigError) as info:
        parse("age >= f(1)", what="analysis.where")
    first, shown, caret = str(info.value).split("\n")
    assert first.startswith("analysis.where: unexpected '(' at column 9: calls are not allowed")
    assert shown == "  age >= f(1)"
    assert caret.index("^") == shown.index("(")
    with pytest.raises(ConfigError, match="line 2, column 2"):
        parse("a == 1 and\nb.c == 2")


def test_a_filter_that_is_not_text_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be a text"):
        parse(5)  # type: ignore[arg-type]


def test_limits() -> None:
    parse("(" * MAX_DEPTH + "a == 1" + ")" * MAX_DEPTH)
    parse("not " * MAX_DEPTH + "a == 1")
    with pytest.raises(ConfigError, match=f"nesting deeper than {MAX_DEPTH}"):
        parse("(" * (MAX_DEPTH + 1) + "a == 1" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(ConfigError, match=f"nesting deeper than {MAX_DEPTH}"):
        parse("not " * (MAX_DEPTH + 1) + "a == 1")
    with pytest.raises(ConfigError, match=f"nesting deeper than {MAX_DEPTH}"):
        parse("(" * MAX_LENGTH)  # refused before Python's recursion limit
    # "a == 1" is three nodes, and k of them joined by "or" are 3k + 1.
    parse(" or ".join(["a == 1"] * ((MAX_NODES - 1) // 3)))
    with pytest.raises(ConfigError, match=f"more than {MAX_NODES} nodes"):
        parse(" or ".join(["a == 1"] * ((MAX_NODES - 1) // 3 + 1)))
    with pytest.raises(ConfigError, match=f"more than {MAX_NODES} nodes"):
        parse("x in [" + ", ".join(["1"] * MAX_NODES) + "]")
    parse("a == 1".ljust(MAX_LENGTH))
    with pytest.raises(ConfigError, match=f"limit of {MAX_LENGTH}"):
        parse("a == 1".ljust(MAX_LENGTH + 1))


def test_nothing_is_ever_evaluated_as_python(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the filter reached eval/exec/compile")

    table = {"age": pa.array(["50", "61", None]), "sex": pa.array(["female", "male", "female"])}
    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, refuse)
    expr = parse("age >= 50 and sex in ['female'] or age is missing")
    assert evaluate(expr, table, 3).tolist() == [True, False, True]
    with pytest.raises(ConfigError, match="calls are not allowed"):
        parse("x == 1 or eval('1')")


# -- evaluation --------------------------------------------------------------------------------


def _rows(text: str, table: dict[str, Any]) -> list[bool]:
    rows = len(next(iter(table.values())))
    out = evaluate(parse(text), table, rows)
    assert out.dtype == np.bool_ and out.shape == (rows,)
    return list(out.tolist())


CSV = {  # as the CSV reader gives them: stripped text, null for missing
    "age": pa.array(["50", "61", None, "40", "1e2"]),
    "sex": pa.array(["female", "male", "female", None, "female"]),
    "code": pa.array(["1", "x", "1.0", "2", None]),
    "flag": pa.array(["TRUE", "false", "True", None, "no"]),
    "day": pa.array(["2020-01-05", "2019-12-31", None, "2020-03-01", "2021-01-01"]),
}


@pytest.mark.parametrize(("text", "expected"), [
    ("age >= 50 and sex == 'female'", [True, False, False, False, True]),
    ("age > 55", [False, True, False, False, True]),
    ("not age > 55", [True, False, False, True, False]),
    ("age == 100", [False, False, False, False, True]),
    ("age == '50.0'", [True, False, False, False, False]),  # a numeric column: numbers compare
    ("100 <= age", [False, False, False, False, True]),
    ("age between 40 and 61", [True, True, False, True, False]),
    ("age not between 41 and 60", [False, True, False, True, True]),
    ("sex != 'male'", [True, False, True, False, True]),
    ("sex == ' female '", [True, False, True, False, True]),  # stripped
    ("sex == 'Female'", [False] * 5),  # text is case-sensitive
    ("sex == 1", [False, False, False, False, False]),
    ("code == 1", [True, False, True, False, False]),  # numbers-as-text, "1.0" is 1
    ("code != 1", [False, True, False, True, False]),
    ("code in [1, 'x']", [True, True, True, False, False]),
    ("code not in [2]", [True, True, True, False, False]),
    ("code == '1'", [True, False, False, False, False]),  # quoted: text against text
    ("flag == true", [True, False, True, False, False]),
    ("flag in [false]", [False, True, False, False, False]),
    ("day >= '2020-01-01'", [True, False, False, True, True]),
    ("sex is missing or code is missing", [False, False, False, True, True]),
    ("age is not missing", [True, True, False, True, True]),
])
def test_csv_columns(text: str, expected: list[bool]) -> None:
    assert _rows(text, CSV) == expected


TYPED = {  # as Parquet keeps them: null or NaN is missing
    "n": pa.array([1, None, 3, 4, 5], pa.int64()),
    "f": pa.array([1.0, float("nan"), 3.5, None, 2.0]),
    "b": pa.array([True, False, None, True, False]),
    "s": pa.array(["a", "b ", None, "", "a"]),
    "t": pa.array(["1", "2", "3", "4", "5"]),
}


@pytest.mark.parametrize(("text", "expected"), [
    ("n >= 3", [False, False, True, True, True]),
    ("n != 3", [True, False, False, True, True]),
    ("f > 1.5", [False, False, True, False, True]),
    ("f <= 2", [True, False, False, False, True]),
    ("f is missing", [False, True, False, True, False]),
    ("f > n", [False, False, True, False, False]),
    ("f == n or n == 5", [True, False, False, False, True]),
    ("b == true", [True, False, False, True, False]),
    ("b != 1", [False, True, False, False, True]),
    ("s == 'b'", [False, True, False, False, False]),
    ("s is missing", [False, False, True, True, False]),  # a blank text is missing
    ("s in ['a', 'z']", [True, False, False, False, True]),
    ("t == n", [True, False, True, True, True]),
    ("t < f", [False, False, True, False, False]),
    ("n in [1, '4', 2.0]", [True, False, False, True, False]),
    ("n == 'x'", [False, False, False, False, False]),
    ("n != 'x'", [True, False, True, True, True]),
])
def test_typed_columns(text: str, expected: list[bool]) -> None:
    assert _rows(text, TYPED) == expected


LOGIC = {"x": pa.array([1, None, 10]), "y": pa.array(["a", "a", "b"])}


@pytest.mark.parametrize(("text", "expected"), [
    ("x > 5", [False, False, True]),
    ("not x > 5", [True, False, False]),  # missing stays unmatched under not
    ("x > 5 or y == 'a'", [True, True, True]),  # unknown or true = true
    ("x > 5 and y == 'a'", [False, False, False]),
    ("not (x > 5 and y == 'b')", [True, True, False]),  # unknown and false = false
    ("not (x > 5 or y == 'b')", [True, False, False]),  # unknown or false = unknown
    ("not not x > 5", [False, False, True]),
    ("x is missing or x > 5", [False, True, True]),
    ("x != 1", [False, False, True]),
    ("x not in [1]", [False, False, True]),
    ("not x in [1]", [False, False, True]),
    ("x not between 0 and 5", [False, False, True]),
])
def test_three_valued_logic(text: str, expected: list[bool]) -> None:
    assert _rows(text, LOGIC) == expected


# A row-by-row reference in plain Python, with None as "unknown", to check the vectorised code.
_OPS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}
REF = {"x": [3, None, -1, 0, 7, 3, None, 12], "s": ["b", "a", None, "c", "b", "", "a", "d"]}
REF_TABLE = {"x": pa.array(REF["x"], pa.int64()), "s": pa.array(REF["s"])}


def _reference(e: Expr, i: int) -> bool | None:
    def val(o: Column | Literal) -> Any:
        if isinstance(o, Literal):
            return o.value
        v = REF[o.name][i]
        return None if v == "" else v

    if isinstance(e, Not):
        r = _reference(e.part, i)
        return None if r is None else not r
    if isinstance(e, (And, Or)):
        rs = [_reference(p, i) for p in e.parts]
        decisive = isinstance(e, Or)
        if decisive in rs:
            return decisive
        return None if None in rs else not decisive
    if isinstance(e, IsMissing):
        return (val(e.column) is None) != e.negated
    if isinstance(e, Between):
        return _reference(And((Compare(">=", e.column, e.low), Compare("<=", e.column, e.high))),
                          i) if not e.negated else _reference(
            Not(Between(e.column, e.low, e.high)), i)
    if isinstance(e, In):
        r = _reference(Or(tuple(Compare("==", e.column, v) for v in e.values)), i)
        return r if not e.negated or r is None else not r
    assert isinstance(e, Compare)
    a, b = val(e.left), val(e.right)
    return None if a is None or b is None else _OPS[e.op](a, b)


_x_leaf = st.one_of(
    st.builds(Compare, st.sampled_from(list(_OPS)), st.just(Column("x")),
              st.integers(-2, 13).map(Literal)),
    st.builds(In, st.just(Column("x")), st.lists(st.integers(-2, 13).map(Literal), min_size=1,
                                                 max_size=3).map(tuple), st.booleans()),
    st.builds(Between, st.just(Column("x")), st.integers(-2, 8).map(Literal),
              st.integers(0, 13).map(Literal), st.booleans()),
)
_s_leaf = st.one_of(
    st.builds(Compare, st.sampled_from(list(_OPS)), st.just(Column("s")),
              st.sampled_from(["a", "b", "bb", "c", "e"]).map(Literal)),
    st.builds(In, st.just(Column("s")), st.lists(st.sampled_from(["a", "c", "z"]).map(Literal),
                                                 min_size=1, max_size=2).map(tuple), st.booleans()),
)
_ref_trees = st.recursive(
    st.one_of(_x_leaf, _s_leaf, st.builds(IsMissing, st.sampled_from([Column("x"), Column("s")]),
                                          st.booleans())),
    lambda inner: st.one_of(inner.map(Not), _junction(And, inner), _junction(Or, inner)),
    max_leaves=8,
)


@settings(max_examples=120, deadline=None)
@given(_ref_trees)
def test_evaluation_matches_a_row_by_row_reference(expr: Expr) -> None:
    got = evaluate(parse(str(expr)), REF_TABLE, 8).tolist()
    assert got == [_reference(expr, i) is True for i in range(8)]


def test_chunked_columns_and_no_rows() -> None:
    chunked = {"x": pa.chunked_array([pa.array([1, 2]), pa.array([3])])}
    assert _rows("x >= 2", chunked) == [False, True, True]
    empty = evaluate(parse("x > 1 and y == 'a'"), {"x": pa.array([], pa.int64()),
                                                   "y": pa.array([], pa.string())}, 0)
    assert empty.shape == (0,) and empty.dtype == np.bool_


# -- evaluation errors -------------------------------------------------------------------------


def test_an_unknown_column_is_named_with_the_available_ones() -> None:
    with pytest.raises(DataError) as info:
        evaluate(parse("agee > 5 and sex == 'f' and zzz == 1"), CSV, 5)
    message = str(info.value)
    assert "unknown columns 'agee', 'zzz'" in message
    assert "'age', 'code', 'day', 'flag', 'sex'" in message
    assert "did you mean 'age'" in message


def test_ordering_text_against_a_number_names_the_column_and_a_value() -> None:
    with pytest.raises(DataError, match=r"column 'code' holds text \(such as 'x'\)"):
        evaluate(parse("code > 1"), CSV, 5)
    with pytest.raises(DataError, match="column 'sex' holds text"):
        evaluate(parse("sex between 1 and 2"), CSV, 5)
    with pytest.raises(DataError, match="column 'code' holds text"):
        evaluate(parse("code < age"), CSV, 5)
    with pytest.raises(DataError, match="column 'n' holds numbers"):
        evaluate(parse("n > 'abc'"), TYPED, 5)


def test_a_column_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(DataError, match="has 2 rows, expected 3"):
        evaluate(parse("x == 1"), {"x": pa.array([1, 2])}, 3)
