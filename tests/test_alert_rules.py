"""The Prometheus alert rules and the Grafana dashboard under deploy/, checked with the real promtool.

promtool comes from the Debian package `prometheus`, installed by `scripts/setup --test`. A missing promtool
is a failure, not a skip: these checks are the only thing standing between a typo and a silent alert.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "ca-service-alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "ca-service-alerts.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "ca-service-dashboard.json"

# The metric names ca-service exports (the contract of issue 5, and the Istio CA API's). Rules and dashboard
# may use nothing else.
CONTRACT_METRICS = frozenset({
    "ca_certificate_expiry_timestamp_seconds",
    "ca_certificate_not_before_timestamp_seconds",
    "ca_workload_certificate_expiry_timestamp_seconds",
    "ca_workload_certificate_issued_timestamp_seconds",
    "ca_workload_namespace_earliest_expiry_timestamp_seconds",
    "ca_workload_svids_expiring",
    "ca_next_rotation_timestamp_seconds",
    "ca_rotations_total",
    "ca_rotation_failures_total",
    "ca_root_rotation_ack_gate_timeouts_total",
    "ca_certificates_issued_total",
    "ca_signing_duration_seconds",
    "ca_sds_active_streams",
    "ca_sds_pushes_total",
    "ca_sds_nacks_total",
    "ca_sds_push_ack_latency_seconds",
    "ca_sds_live_svids",
    "ca_trust_bundle_roots",
    "ca_trust_bundle_sequence",
    "ca_trust_bundle_last_refresh_timestamp_seconds",
    "ca_trust_bundle_refresh_failures_total",
    "ca_scheduler_job_errors_total",
    "ca_scheduler_job_misses_total",
    # The Istio CA API's (issue 13).
    "ca_token_reviews_total",
    "ca_istio_ca_requests_total",
})
HISTOGRAMS = frozenset({"ca_signing_duration_seconds", "ca_sds_push_ack_latency_seconds"})
KNOWN_SERIES = CONTRACT_METRICS | {f"{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

# What the dashboard must show (issue 5: expiry timeline, rotations, SDS streams, NACKs, bundle freshness).
DASHBOARD_MUST_USE = frozenset({
    "ca_certificate_expiry_timestamp_seconds",
    "ca_workload_certificate_expiry_timestamp_seconds",
    "ca_rotations_total",
    "ca_rotation_failures_total",
    "ca_sds_active_streams",
    "ca_sds_pushes_total",
    "ca_sds_nacks_total",
    "ca_sds_push_ack_latency_seconds_bucket",
    "ca_trust_bundle_last_refresh_timestamp_seconds",
    "ca_trust_bundle_sequence",
    "ca_trust_bundle_roots",
})

METRIC_NAME = re.compile(r"(?<![\w:])ca_[a-z_]+")
RECORDED_NAME = re.compile(r"(?<![\w:])ca:[a-z_:]+")
# Grafana variables in dashboard queries, replaced by something PromQL accepts before promtool parses them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$trust_domain": ".*", "$instance": ".*"}


def metric_names(expr: str) -> set[str]:
    """The `ca_` metric names an expression refers to."""
    return set(METRIC_NAME.findall(expr))


def load_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alert_names() -> set[str]:
    return {rule["alert"] for rule in load_rules() if "alert" in rule}


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    panels: list[dict[str, Any]] = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title / refId, PromQL) for every query of the dashboard."""
    return [(f"{panel['title']} / {target['refId']}", target["expr"])
            for panel in dashboard_panels() for target in panel.get("targets", [])]


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if path is None:
        pytest.fail("promtool not found (neither on PATH nor /usr/bin/promtool). It comes from the Debian "
                    "package `prometheus`: run `scripts/setup --test` or `apt-get install -y prometheus`.")
    return path


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


# ---------------------------------------------------------------------------------------------------- promtool


def test_promtool_check_rules_accepts_the_rules(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_fire_and_resolve_every_alert(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules_rejects_a_broken_copy(promtool: str, tmp_path: Path) -> None:
    text = RULES.read_text()
    broken = text.replace("> 0.75", "> > 0.75", 1)
    assert broken != text
    path = tmp_path / "broken-alerts.yaml"
    path.write_text(broken)

    result = run_promtool(promtool, "check", "rules", path)

    assert result.returncode != 0
    assert "parse error" in result.stdout + result.stderr


# A wrong threshold in the rules must make the unit tests fail: they pin the behaviour, not just the syntax.
@pytest.mark.parametrize(
    ("change", "original", "mutant"),
    [
        ("workload threshold 6h -> 8h", "< 6 * 3600", "< 8 * 3600"),
        ("renewal overdue 75% -> 85%", "> 0.75", "> 0.85"),
        ("intermediate warning horizon 7d -> 8d", "vector(7 * 86400)  #", "vector(8 * 86400)  #"),
        ("earliest instead of latest CA certificate", "topk by (kind, trust_domain)",
         "bottomk by (kind, trust_domain)"),
        ("bundle stale after 5m instead of 15m", "ca_trust_bundle_last_refresh_timestamp_seconds) > 15 * 60",
         "ca_trust_bundle_last_refresh_timestamp_seconds) > 5 * 60"),
        ("TokenReview errors threshold 3 -> 30", '{result="error"}[10m])) >= 3', '{result="error"}[10m])) >= 30'),
        ("CreateCertificate UNAVAILABLE not counted", 'code=~"UNAVAILABLE|INTERNAL"', 'code=~"INTERNAL"'),
    ],
)
def test_promtool_unit_tests_catch_a_wrong_threshold(
    promtool: str, tmp_path: Path, change: str, original: str, mutant: str
) -> None:
    text = RULES.read_text()
    assert text.count(original) >= 1, f"{change}: {original!r} is no longer in the rules; update this test"
    (tmp_path / RULES.name).write_text(text.replace(original, mutant))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)

    result = run_promtool(promtool, "test", "rules", tmp_path / RULE_TESTS.name)

    assert result.returncode != 0, f"{change}: the unit tests still pass"


# ---------------------------------------------------------------------------------------------------- rules


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    for rule in load_rules():
        if "alert" not in rule:
            continue
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, rule["alert"]
        for annotation in ("summary", "description", "runbook"):
            assert rule.get("annotations", {}).get(annotation, "").strip(), f"{rule['alert']}: no {annotation}"


def test_every_alert_fires_and_is_absent_in_the_unit_tests() -> None:
    """Each alert fires at some eval_time and is absent both before and after it in the same test group."""
    covered: dict[str, list[str]] = {}
    for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        by_alert: dict[str, list[tuple[str, bool]]] = {}
        for case in group.get("alert_rule_test", []):
            by_alert.setdefault(case["alertname"], []).append((case["eval_time"], bool(case.get("exp_alerts"))))
        for alert, cases in by_alert.items():
            times = [(parse_duration(t), fires) for t, fires in cases]
            fired = [t for t, fires in times if fires]
            if (fired and any(not fires and t < min(fired) for t, fires in times)
                    and any(not fires and t > max(fired) for t, fires in times)):
                covered.setdefault(alert, []).append(group["name"])

    missing = alert_names() - covered.keys()
    assert not missing, f"alerts without a fire-and-resolve unit test: {sorted(missing)}"
    unknown = covered.keys() - alert_names()
    assert not unknown, f"unit tests for alerts that do not exist: {sorted(unknown)}"


def parse_duration(text: str) -> int:
    """Seconds in a Prometheus duration such as `1h10m`."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([dhms])", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"unsupported duration {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


def test_rules_use_only_contract_metrics_and_their_own_recordings() -> None:
    rules = load_rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        expr = str(rule["expr"])
        unknown = metric_names(expr) - KNOWN_SERIES
        assert not unknown, f"{rule.get('alert', rule.get('record'))}: not in the metric contract: {unknown}"
        unrecorded = set(RECORDED_NAME.findall(expr)) - recorded
        assert not unrecorded, f"{rule.get('alert')}: no recording rule for {unrecorded}"


def test_every_ca_kind_has_both_expiry_horizons() -> None:
    horizons = {(rule["record"], rule["labels"]["kind"]) for rule in load_rules() if "record" in rule}
    for severity in ("warning", "critical"):
        for kind in ("root", "intermediate", "istiod_intermediate"):
            assert (f"ca:certificate_expiry_{severity}_horizon_seconds", kind) in horizons


# ---------------------------------------------------------------------------------------------------- dashboard


def test_dashboard_uses_only_contract_metrics() -> None:
    used: set[str] = set()
    for where, expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"{where}: no ca_ metric in {expr!r}"
        assert names <= KNOWN_SERIES, f"{where}: not in the metric contract: {names - KNOWN_SERIES}"
        used |= names
    assert used >= DASHBOARD_MUST_USE, f"dashboard shows nothing of {sorted(DASHBOARD_MUST_USE - used)}"


def test_dashboard_queries_parse_as_promql(promtool: str, tmp_path: Path) -> None:
    """Every query, with Grafana's variables substituted, goes through promtool as a recording rule."""
    rules = []
    for i, (where, expr) in enumerate(dashboard_exprs()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr.replace("$1", ""), f"{where}: unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = run_promtool(promtool, "check", "rules", path)

    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_templated_on_datasource_and_trust_domain() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["trust_domain"]["type"] == "query"
    assert variables["trust_domain"]["datasource"]["uid"] == "${datasource}"

    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels():
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
