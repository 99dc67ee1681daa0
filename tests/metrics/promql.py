"""The metric names a PromQL expression (or a Grafana `label_values(...)` query) reads: a small tokenizer."""

from __future__ import annotations

import re

# Functions and aggregations are told apart by the `(` after them; these words name no metric either.
KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
    | {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "group"}
    | {"count_values", "limitk", "limit_ratio", "inf", "nan", "atan2"}
)
# words followed by a parenthesised list of label names (not expressions)
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])                       # [5m], [$__rate_interval], [1h:5m]
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<variable>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}@])
    """,
    re.X,
)


class PromQLSyntaxError(ValueError):
    pass


def tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise PromQLSyntaxError(f"cannot read {expr[pos : pos + 20]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, match.group()))
        pos = match.end()
    return out


def metric_names(expr: str) -> set[str]:
    """Every metric an expression selects: bare names and `{__name__="..."}`, not functions, aggregation
    keywords, label names in `by (...)`/`on (...)` or in `{...}` matchers, nor durations."""
    toks = tokens(expr)
    names: set[str] = set()
    depth = 0  # parentheses
    braces = 0  # inside {...}
    label_list_at: list[int] = []  # paren depths of by (...) lists
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if text == "(":
            depth += 1
        elif text == ")":
            if label_list_at and label_list_at[-1] == depth:
                label_list_at.pop()
            depth -= 1
            if depth < 0:
                raise PromQLSyntaxError(f"unbalanced ) in {expr!r}")
        elif text == "{":
            braces += 1
        elif text == "}":
            braces -= 1
            if braces < 0:
                raise PromQLSyntaxError(f"unbalanced }} in {expr!r}")
        elif kind == "ident":
            if braces:
                if text == "__name__" and i + 2 < len(toks) and toks[i + 1][1] == "=":
                    names.add(toks[i + 2][1][1:-1])
            elif label_list_at and label_list_at[-1] == depth:
                pass  # a label name of by (...)
            elif text in LABEL_LISTS and following == "(":
                label_list_at.append(depth + 1)
            elif following == "(" or text in KEYWORDS:
                pass  # a function or an aggregation
            else:
                names.add(text)
        i += 1
    if depth or braces:
        raise PromQLSyntaxError(f"unbalanced brackets in {expr!r}")
    return names


def grafana_query_names(query: str) -> set[str]:
    """Metric names of a Grafana Prometheus variable query: `label_values(metric{...}, label)`,
    `query_result(expr)`, `metrics(regex)` (none), or a plain PromQL expression."""
    query = query.strip()
    match = re.fullmatch(r"label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", query, re.S)
    if match:
        return metric_names(match.group(1))
    if re.fullmatch(r"label_values\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\)|metrics\(.*\)|label_names\(.*\)", query):
        return set()
    match = re.fullmatch(r"query_result\((.*)\)", query, re.S)
    return metric_names(match.group(1) if match else query)


def family_of(name: str, families: set[str]) -> str | None:
    """The exported family a sample name belongs to (a histogram's _bucket/_sum/_count, a counter's
    _total), or None."""
    if name in families:
        return name
    for suffix in (*HISTOGRAM_SUFFIXES, "_total"):
        if name.endswith(suffix) and name[: -len(suffix)] in families:
            return name[: -len(suffix)]
    return None
