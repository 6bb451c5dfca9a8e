"""Just enough PromQL to check a dashboard: which metrics, labels and functions a query uses.

Not a full parser. It tokenizes (so strings, durations and Grafana variables never pass for
metric names), follows parentheses to know which selectors an aggregation's ``by (...)`` applies
to and which function encloses a selector, and refuses what it does not understand (an unknown
function, unbalanced brackets, a stray character) instead of guessing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

# Prometheus 3.x functions; ``start``/``end`` appear in ``@ start()``.
FUNCTIONS = frozenset("""
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max
    clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv
    double_exponential_smoothing end exp floor histogram_avg histogram_count histogram_fraction
    histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase info
    irate label_join label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time
    minute month pi predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin
    sinh sort sort_by_label sort_by_label_desc sort_desc sqrt start stddev_over_time stdvar_over_time
    sum_over_time tan tanh time timestamp vector year
""".split())
AGGREGATIONS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio".split()
)
GROUPING = frozenset({"by", "without"})
VECTOR_MATCHING = frozenset({"on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})
# Functions whose argument must be a counter: over a gauge they give nonsense, not an error.
COUNTER_FUNCTIONS = frozenset({"rate", "irate", "increase", "resets"})
# Labels Prometheus attaches to every scraped series (more may come from relabelling).
SCRAPE_LABELS = frozenset({"job", "instance"})

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+(?:ms|[smhdwy]))+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<operator>==|!=|=~|!~|<=|>=|[-+*/%^<>=])
  | (?P<punct>[(){}\[\],@])
    """,
    re.VERBOSE,
)
_CLOSING = {"(": ")", "[": "]", "{": "}"}


class PromQLError(ValueError):
    """The expression is not PromQL this reader understands."""


@dataclass(frozen=True)
class Token:
    kind: str
    text: str


@dataclass(frozen=True)
class Selector:
    """A vector selector: the metric, the label names its matchers use, the function around it."""

    metric: str
    labels: frozenset[str]
    enclosing_function: str | None


@dataclass(frozen=True)
class Grouping:
    """``by``/``without``/``on``/``ignoring`` labels and the metrics they must exist on."""

    clause: str
    labels: frozenset[str]
    metrics: frozenset[str]


@dataclass
class Query:
    selectors: list[Selector] = field(default_factory=list)
    groupings: list[Grouping] = field(default_factory=list)
    functions: set[str] = field(default_factory=set)

    @property
    def metrics(self) -> set[str]:
        return {s.metric for s in self.selectors}


def tokenize(expr: str) -> list[Token]:
    tokens: list[Token] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise PromQLError(f"unexpected character {expr[position]!r} at {position} in {expr!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append(Token(kind, match.group()))
        position = match.end()
    return tokens


def parse(expr: str) -> Query:
    """The selectors, groupings and functions of ``expr``; raises :class:`PromQLError`."""
    return _Reader(tokenize(expr)).read()


class _Reader:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.query = Query()

    def read(self) -> Query:
        selectors = self._walk(0, len(self.tokens), None)
        matching = [g for g in self.query.groupings if g.clause in VECTOR_MATCHING and not g.metrics]
        # on()/ignoring() apply to both operands of their binary operator: check them against every selector.
        every_metric = frozenset(s.metric for s in selectors)
        for grouping in matching:
            self.query.groupings.remove(grouping)
            self.query.groupings.append(Grouping(grouping.clause, grouping.labels, every_metric))
        return self.query

    def _text(self, index: int) -> str:
        return self.tokens[index].text if index < len(self.tokens) else ""

    def _word(self, index: int) -> str:
        token = self.tokens[index] if index < len(self.tokens) else None
        return token.text.lower() if token is not None and token.kind == "ident" else ""

    def _closing(self, index: int) -> int:
        opener = self.tokens[index].text
        depth = 0
        for position in range(index, len(self.tokens)):
            text = self.tokens[position].text if self.tokens[position].kind == "punct" else ""
            if text == opener:
                depth += 1
            elif text == _CLOSING[opener]:
                depth -= 1
                if depth == 0:
                    return position
        raise PromQLError(f"unclosed {opener!r}")

    def _walk(self, low: int, high: int, enclosing: str | None) -> list[Selector]:
        found: list[Selector] = []
        index = low
        while index < high:
            token = self.tokens[index]
            if token.kind == "ident":
                index = self._ident(index, high, enclosing, found)
            elif token.kind == "punct" and token.text == "{":
                labels, index = self._matchers(index)
                name = labels.get("__name__")
                if not name:
                    raise PromQLError("a selector without a metric name needs __name__=\"...\"")
                found.append(self._select(name, labels, enclosing))
            elif token.kind == "punct" and token.text == "[":
                index = self._closing(index) + 1  # a range or subquery: durations and variables only
            elif token.kind == "punct" and token.text == "(":
                close = self._closing(index)
                found += self._walk(index + 1, close, enclosing)
                index = close + 1
            elif token.kind == "punct" and token.text in (")", "]", "}"):
                raise PromQLError(f"unbalanced {token.text!r}")
            else:
                index += 1
        return found

    def _ident(self, index: int, high: int, enclosing: str | None, found: list[Selector]) -> int:
        text, word, following = self.tokens[index].text, self._word(index), self._text(index + 1)
        if word in AGGREGATIONS and (following == "(" or self._word(index + 1) in GROUPING):
            return self._aggregation(index, high, enclosing, found)
        if word in GROUPING:
            raise PromQLError(f"{word} (...) outside an aggregation")
        if word in VECTOR_MATCHING:
            labels, index = self._label_list(index + 1)
            self.query.groupings.append(Grouping(word, labels, frozenset()))
            return index
        if following == "(":
            if text not in FUNCTIONS:
                raise PromQLError(f"unknown function {text}()")
            self.query.functions.add(text)
            close = self._closing(index + 1)
            found += self._walk(index + 2, close, text)
            return close + 1
        if word in KEYWORDS:
            return index + 1
        labels: dict[str, str | None] = {}
        index += 1
        if self._text(index) == "{":
            labels, index = self._matchers(index)
        found.append(self._select(text, labels, enclosing))
        return index

    def _select(self, metric: str, labels: Mapping[str, str | None], enclosing: str | None) -> Selector:
        selector = Selector(metric, frozenset(labels) - {"__name__"}, enclosing)
        self.query.selectors.append(selector)
        return selector

    def _aggregation(self, index: int, high: int, enclosing: str | None, found: list[Selector]) -> int:
        clause, labels = "", frozenset[str]()
        position = index + 1
        if self._word(position) in GROUPING:
            clause = self._word(position)
            labels, position = self._label_list(position + 1)
        if self._text(position) != "(":
            raise PromQLError(f"{self.tokens[index].text} needs a parenthesised argument")
        close = self._closing(position)
        inner = self._walk(position + 1, close, enclosing)
        position = close + 1
        if not clause and position < high and self._word(position) in GROUPING:
            clause = self._word(position)
            labels, position = self._label_list(position + 1)
        if clause:
            self.query.groupings.append(Grouping(clause, labels, frozenset(s.metric for s in inner)))
        found += inner
        return position

    def _label_list(self, index: int) -> tuple[frozenset[str], int]:
        if self._text(index) != "(":
            return frozenset(), index  # group_left / group_right may name no labels
        close = self._closing(index)
        names = [t for t in self.tokens[index + 1 : close] if not (t.kind == "punct" and t.text == ",")]
        if any(t.kind != "ident" for t in names):
            raise PromQLError(f"not a label list: {' '.join(t.text for t in self.tokens[index:close + 1])}")
        return frozenset(t.text for t in names), close + 1

    def _matchers(self, index: int) -> tuple[dict[str, str | None], int]:
        """``{name op "value", ...}`` from the ``{`` at ``index``: names to exact values (None for the others)."""
        close = self._closing(index)
        labels: dict[str, str | None] = {}
        parts = self.tokens[index + 1 : close]
        position = 0
        while position < len(parts):
            triple = parts[position : position + 3]
            if len(triple) < 3 or [t.kind for t in triple] != ["ident", "operator", "string"] or \
                    triple[1].text not in ("=", "!=", "=~", "!~"):
                raise PromQLError(f"bad label matcher near {' '.join(t.text for t in triple)!r}")
            labels[triple[0].text] = triple[2].text[1:-1] if triple[1].text == "=" else None
            position += 3
            if position < len(parts):
                if parts[position].text != ",":
                    raise PromQLError(f"expected ',' between label matchers, got {parts[position].text!r}")
                position += 1
        return labels, close + 1


@dataclass(frozen=True)
class ExportedSample:
    labels: frozenset[str]
    counter_like: bool  # monotonic: a counter's _total, a histogram's _bucket/_sum/_count


def exported_samples(registry: CollectorRegistry, wrappers: Iterable[object]) -> dict[str, ExportedSample]:
    """Every sample name the registry can expose, with its label names.

    A labelled metric exposes nothing until a child exists, so each one in ``wrappers`` (the
    registry's metric objects) gets a placeholder child first: use a throwaway registry.
    Sample names come from prometheus_client itself, so ``_total``, ``_bucket`` (with ``le``),
    ``_sum``, ``_count`` and ``_created`` are exactly what a scrape shows.
    """
    for wrapper in wrappers:
        if isinstance(wrapper, MetricWrapperBase):
            names = wrapper._labelnames  # no public accessor; stable across prometheus_client releases
            if names:
                wrapper.labels(*(["placeholder"] * len(names)))
    samples: dict[str, ExportedSample] = {}
    for family in registry.collect():
        for sample in family.samples:
            counter_like = family.type in ("counter", "histogram") and not sample.name.endswith("_created")
            previous = samples.get(sample.name)
            labels = frozenset(sample.labels) | (previous.labels if previous else frozenset())
            samples[sample.name] = ExportedSample(labels, counter_like)
    return samples


def problems(expr: str, exported: Mapping[str, ExportedSample], extra_labels: Iterable[str] = ()) -> list[str]:
    """What is wrong with ``expr`` against the exported samples; empty when it is fine.

    ``extra_labels`` are labels the scrape adds (``job``, ``instance``, relabelled targets).
    """
    try:
        query = parse(expr)
    except PromQLError as error:
        return [f"cannot parse: {error}"]
    target_labels = SCRAPE_LABELS | frozenset(extra_labels)
    found: list[str] = []
    if not query.selectors:
        found.append("refers to no metric")
    for selector in query.selectors:
        sample = exported.get(selector.metric)
        if sample is None:
            found.append(f"unknown metric {selector.metric}")
            continue
        for label in sorted(selector.labels - sample.labels - target_labels):
            found.append(f"{selector.metric} has no label {label!r}")
        if selector.enclosing_function in COUNTER_FUNCTIONS and not sample.counter_like:
            found.append(f"{selector.enclosing_function}() over {selector.metric}, which is not a counter")
    for grouping in query.groupings:
        for metric in sorted(grouping.metrics & exported.keys()):
            for label in sorted(grouping.labels - exported[metric].labels - target_labels):
                found.append(f"{grouping.clause} ({label}): {metric} has no label {label!r}")
    return found
