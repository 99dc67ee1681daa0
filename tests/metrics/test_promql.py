"""The PromQL tokenizer that checks the dashboard finds metric names, and only those."""

from __future__ import annotations

import pytest

from tests.metrics.promql import PromQLSyntaxError, family_of, grafana_query_names, metric_names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('sum by (route) (rate(a_total{route=~"/v1/.*", model="$model"}[$__rate_interval]))', {"a_total"}),
        ("sum(rate(a_total[5m])) by (le, model) / ignoring(kind) group_left(x) b", {"a_total", "b"}),
        (
            "histogram_quantile(0.95, sum by (le) (rate(lat_seconds_bucket{job='x'}[1h:5m])))",
            {"lat_seconds_bucket"},
        ),
        ("count without (pid) (c) > bool 0 and on (model) d offset 5m", {"c", "d"}),
        ('{__name__="by_name", kind!="x"} * 3600', {"by_name"}),
        ("topk(5, max_over_time(g[${__range}]))", {"g"}),
        ("min(x) or vector(0)", {"x"}),
        ('sum(rate(x{a="sum(y)"}[1m]))  # rate(z)', {"x"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize("expr", ["sum(rate(x[5m])", "x{a='b'", "rate(x))", "x ? y"])
def test_broken_expressions_are_refused(expr: str) -> None:
    with pytest.raises(PromQLSyntaxError):
        metric_names(expr)


def test_grafana_variable_queries() -> None:
    assert grafana_query_names('label_values(a_total{ns=~"$ns"}, model)') == {"a_total"}
    assert grafana_query_names("label_values(namespace)") == set()
    assert grafana_query_names("query_result(topk(3, b))") == {"b"}


def test_family_of_suffixed_samples() -> None:
    families = {"lat_seconds", "requests"}
    assert family_of("lat_seconds_bucket", families) == "lat_seconds"
    assert family_of("lat_seconds_count", families) == "lat_seconds"
    assert family_of("requests_total", families) == "requests"
    assert family_of("nothing_total", families) is None
