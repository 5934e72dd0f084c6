"""Offline checks of deploy/prometheus with Debian's promtool: the scrape configs, the alert
rules, and the rules' unit tests (deploy/prometheus/tests)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.rules.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.test.yml"))

# What the issue asks the alerts to cover, and the alert that does.
REQUIRED_ALERTS = {
    "KL over budget": "RlhfKLOverBudget",
    "drift-gate refusals": "RlhfDriftGateRefusals",
    "reward-hacking signature": "RlhfRewardHacking",
    "feedback consumer lag": "RlhfFeedbackConsumerLag",
    "outbox backlog": "RlhfOutboxBacklog",
    "policy version stuck": "RlhfPolicyVersionStuck",
    "service down": "RlhfServiceDown",
    "Kafka unreachable": "RlhfKafkaDown",
    "lost Kafka log": "RlhfKafkaLogLost",
    "canary candidate's thumbs-down rate significantly above stable's": "RlhfCanaryThumbsDown",
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool missing: run scripts/install-system-deps.sh (Debian package prometheus)"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def alerts() -> dict[str, dict]:
    return {
        r["alert"]: r
        for path in RULE_FILES
        for g in yaml.safe_load(path.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-k8s.yml"])
def test_promtool_check_config(config):
    result = promtool("check", "config", str(PROMETHEUS_DIR / config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_compose_config_loads_the_rule_files():
    result = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    for path in RULE_FILES:
        assert f"Checking {PROMETHEUS_DIR / 'rules' / path.name}" in result.stdout, result.stdout


def test_promtool_check_rules():
    assert RULE_FILES
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules():
    assert RULE_TESTS
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout + result.stderr


def test_required_alerts_exist_with_severity_and_text():
    found = alerts()
    for concern, name in REQUIRED_ALERTS.items():
        assert name in found, f"no alert for {concern} ({name})"
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_alert_has_a_unit_test_that_fires_it():
    """Each alert appears in some test with a non-empty exp_alerts (a test of silence only
    would pass for a rule that can never fire)."""
    fired = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                if t.get("exp_alerts"):
                    fired.add(t["alertname"])
    assert set(alerts()) - fired == set()
