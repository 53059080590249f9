"""Just enough of a PromQL lexer to list the series selectors of an expression: metric names, the
label names their matchers use, and the labels of `by`/`without`/`on`/`ignoring` clauses."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "atan2"}  # fmt: skip
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Aggregations may put their `by (...)` clause before the parenthesis: `sum by (le) (...)`.
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile", "limitk", "limit_ratio"}  # fmt: skip

TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      |(?P<matchers>\{[^}]*\})
      |(?P<range>\[[^\]]*\])
      |(?P<duration>\d+(?:ms|[smhdwy])\b)
      |(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
      |(?P<open>\()
      |(?P<close>\))
      |(?P<space>\s+)
      |(?P<other>.)""",
    re.VERBOSE,
)
MATCHER = re.compile(
    r"""([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')"""
)


@dataclass
class Selectors:
    metrics: dict[str, set[str]] = field(default_factory=dict)  # name -> labels in its matchers
    grouping: set[str] = field(default_factory=set)


def selectors(expr: str) -> Selectors:
    """The metric names (with their matcher labels) and grouping labels of a PromQL expression."""
    tokens = [(m.lastgroup, m.group()) for m in TOKEN.finditer(expr) if m.lastgroup != "space"]
    out = Selectors()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "ident" and text in GROUPING and nxt[0] == "open":
            j = i + 2
            while j < len(tokens) and tokens[j][0] != "close":
                if tokens[j][0] == "ident":
                    out.grouping.add(tokens[j][1])
                j += 1
            i = j + 1
            continue
        aggregation = text in AGGREGATIONS and nxt[1] in ("by", "without")
        if kind == "ident" and text not in KEYWORDS and nxt[0] != "open" and not aggregation:
            labels = out.metrics.setdefault(text, set())
            if nxt[0] == "matchers":
                labels.update(MATCHER.findall(nxt[1]))
        i += 1
    return out
