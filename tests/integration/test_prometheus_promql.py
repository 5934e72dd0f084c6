"""Which metric names do the dashboards and alert rules query, and which do the services export?

The helpers here feed test_prometheus_live.py, which compares the two against live scrapes
of the running stack. The tests here pin down the helpers themselves (the extraction has to
be right for that comparison to mean anything) and check that every dashboard query is
valid PromQL, by handing them to promtool as recording rules.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD_DIR = ROOT / "deploy" / "grafana" / "dashboards"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.rules.yml"))

# Grafana's global variables, replaced by a value of the same kind before PromQL sees them.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
# numbers and durations first, so "1e3" or "5m" never reads as a name
_TOKEN = re.compile(
    r"(?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z]*)"
    r"|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<call>\s*\()?"
)
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
}


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions,
    aggregations, keywords, label names (in matchers and by/on lists) or numbers."""
    expr = grafana_to_promql(expr)
    names = {m.group(1) for m in re.finditer(r'__name__\s*=\s*"([^"]*)"', expr)}
    expr = _VARIABLE.sub("", _STRING.sub('""', expr))
    expr = _LABEL_LIST.sub(" ", _BRACKETS.sub(" ", _MATCHERS.sub(" ", expr)))
    for m in _TOKEN.finditer(expr):
        name = m.group("name")
        if name and not m.group("call") and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def exported_names(exposition: str) -> set[str]:
    """Series names a /metrics page (Prometheus text format) makes queryable.

    A labelled metric that has not been touched yet has no sample lines, only HELP and
    TYPE; it still counts, with the names Prometheus will store once it has samples:
    counter `x` → `x_total` (and `x_created`), histogram `x` → `x_bucket`, `x_sum`,
    `x_count`, gauge `x` → `x`. The bare name of a counter or histogram is not a series.
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "gauge": ("",),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names |= {s.name for s in family.samples}
        names |= {family.name + sfx for sfx in suffixes.get(family.type, ("",))}
    return names


def dashboard_queries() -> dict[str, str]:
    """{"<dashboard> / <panel> [refId]": expr} for every query of every dashboard."""
    out = {}
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        dash = json.loads(path.read_text())
        panels = list(dash["panels"])
        for p in list(panels):
            panels.extend(p.get("panels", []))  # panels inside collapsed rows
        for p in panels:
            for t in p.get("targets", []):
                out[f"{path.name} / {p['title']} [{t['refId']}]"] = t["expr"]
    return out


def rule_queries() -> dict[str, str]:
    """{"<file> / <alert or record>": expr} for every rule."""
    out = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out[f"{path.name} / {rule.get('alert') or rule.get('record')}"] = rule["expr"]
    return out


def missing_metrics(queries: dict[str, str], exported: set[str]) -> dict[str, list[str]]:
    """{query location: [names it selects that nobody exports]}, empty when all is well."""
    missing = {}
    for where, expr in queries.items():
        unknown = sorted(metric_names(expr) - exported)
        if unknown:
            missing[where] = unknown
    return missing


def job_names(config: Path = PROMETHEUS_DIR / "prometheus.yml") -> set[str]:
    return {job["job_name"] for job in yaml.safe_load(config.read_text())["scrape_configs"]}


def job_matchers(expr: str) -> set[str]:
    """Job names a query selects with job="x" or job=~"a|b" (plain alternations only)."""
    jobs = set()
    for op, value in re.findall(r'\bjob\s*(=~|=)\s*"([^"]*)"', expr):
        jobs |= set(value.split("|")) if op == "=~" else {value}
    return jobs


# ---- the helpers, on cases whose answer is known ---------------------------------------------

EXPOSITION = """\
# HELP rlhf_grpc_server_handled_total RPCs handled
# TYPE rlhf_grpc_server_handled_total counter
# HELP rlhf_grpc_server_handling_seconds Time to handle an RPC
# TYPE rlhf_grpc_server_handling_seconds histogram
rlhf_grpc_server_handling_seconds_bucket{method="Score",le="0.1"} 1.0
rlhf_grpc_server_handling_seconds_bucket{method="Score",le="+Inf"} 1.0
rlhf_grpc_server_handling_seconds_count{method="Score"} 1.0
rlhf_grpc_server_handling_seconds_sum{method="Score"} 0.05
# HELP rlhf_service_ready 1 while SERVING
# TYPE rlhf_service_ready gauge
rlhf_service_ready{service="reward"} 1.0
"""


def test_exported_names_follow_prometheus_series_naming():
    names = exported_names(EXPOSITION)
    # a labelled counter with no sample yet is still exported, as x_total
    assert "rlhf_grpc_server_handled_total" in names
    assert "rlhf_grpc_server_handled" not in names
    assert {
        "rlhf_grpc_server_handling_seconds_bucket",
        "rlhf_grpc_server_handling_seconds_sum",
        "rlhf_grpc_server_handling_seconds_count",
    } <= names
    assert "rlhf_grpc_server_handling_seconds" not in names
    assert "rlhf_service_ready" in names


@pytest.mark.parametrize(
    "expr, names",
    [
        (
            'sum by (kind) (rate(rlhf_feedback_events_total{job="gateway", kind=~"thumbs.*"}[$__rate_interval]))',
            {"rlhf_feedback_events_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le, job) (rate(rlhf_grpc_server_handling_seconds_bucket[5m])))",
            {"rlhf_grpc_server_handling_seconds_bucket"},
        ),
        (
            "max(delta(a_score[2h])) > 0.1 and on() min(delta(b_accuracy[2h:1m] offset 1h)) < -5e-2",
            {"a_score", "b_accuracy"},
        ),
        ('label_replace(up{job="x"}, "svc", "$1", "job", "(.*)") == bool 0 unless ignoring(svc) vector(1)', {"up"}),
        (
            '{__name__="rlhf_outbox_backlog", job="gateway"} + rlhf_x:recorded',
            {"rlhf_outbox_backlog", "rlhf_x:recorded"},
        ),
        ("absent(up{job=\"a\"}) or absent(up{job='b'})", {"up"}),
    ],
)
def test_metric_names_of_a_query(expr, names):
    assert metric_names(expr) == names


def test_a_panel_on_a_missing_metric_is_reported():
    exported = exported_names(EXPOSITION)
    queries = {
        "ok": "sum(rate(rlhf_grpc_server_handled_total[5m]))",
        "typo": "rate(rlhf_grpc_server_handled_totl[5m])",
        "counter without _total": "rate(rlhf_grpc_server_handled[5m])",
        "histogram without _bucket": "histogram_quantile(0.5, rate(rlhf_grpc_server_handling_seconds[5m]))",
        "not exported": "rlhf_learner_kl_nats > 1",
    }
    assert missing_metrics(queries, exported) == {
        "typo": ["rlhf_grpc_server_handled_totl"],
        "counter without _total": ["rlhf_grpc_server_handled"],
        "histogram without _bucket": ["rlhf_grpc_server_handling_seconds"],
        "not exported": ["rlhf_learner_kl_nats"],
    }


def test_job_matchers():
    assert job_matchers('up{job=~"generator|reward"} + x{job="gateway", topic=~"a|b"}') == {
        "generator",
        "reward",
        "gateway",
    }


# ---- the shipped dashboards and rules --------------------------------------------------------


def test_there_are_queries_to_check():
    assert len(dashboard_queries()) >= 20
    assert len(rule_queries()) >= 10


def test_queries_select_only_jobs_that_are_scraped():
    jobs = job_names()
    wrong = {
        where: sorted(job_matchers(expr) - jobs)
        for where, expr in {**dashboard_queries(), **rule_queries()}.items()
        if job_matchers(expr) - jobs
    }
    assert wrong == {}, f"job names not in deploy/prometheus/prometheus.yml: {wrong}"


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each panel query as the expression of a recording rule."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run scripts/install-system-deps.sh (Debian package prometheus)"
    queries = dashboard_queries()
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)} for i, expr in enumerate(queries.values())
    ]
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, allow_unicode=True))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_every_metric_an_alert_reads_is_charted():
    """An operator paged by an alert finds its metric on a dashboard (consumer lag was once
    exported and alerted on, never charted)."""
    charted = set().union(*(metric_names(expr) for expr in dashboard_queries().values()))
    recorded = {where.split(" / ", 1)[1] for where in rule_queries()}
    uncharted = {
        where: sorted(metric_names(expr) - charted - recorded)
        for where, expr in rule_queries().items()
        if metric_names(expr) - charted - recorded
    }
    assert uncharted == {}
