"""The Grafana side, checked offline (no Grafana here): the dashboards are exactly what
deploy/grafana/build_dashboards.py generates, well-formed, laid out without overlaps, bound
to the provisioned datasource, and the provisioning files point where compose mounts them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def builder():
    spec = importlib.util.spec_from_file_location("build_dashboards", GRAFANA / "build_dashboards.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_dashboards_are_generated_from_the_builder():
    expected = builder().rendered()
    assert sorted(expected) == [p.name for p in DASHBOARDS]
    for path in DASHBOARDS:
        assert path.read_text() == expected[path.name], (
            f"{path.name} is stale: run python deploy/grafana/build_dashboards.py"
        )


def test_the_three_dashboards_the_issue_names():
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert titles == {"RLHF loop", "RLHF serving", "RLHF Kafka"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path):
    dash = json.loads(path.read_text())
    assert dash["uid"] and len(dash["uid"]) <= 40
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cell & cells, f"panel {p['title']!r} overlaps another"
        cells |= cell
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_show_what_they_chart(path):
    """The SDK's defaults are not ours: a time series hides its legend unless told, so
    check what an operator would see — a legend under each chart, one last value per stat,
    the unit and bounds the builder declares."""
    declared = {p.title: p for p in builder().DASHBOARDS[path.name].items if hasattr(p, "targets")}
    panels = [p for p in json.loads(path.read_text())["panels"] if p["type"] != "row"]
    assert sorted(p["title"] for p in panels) == sorted(declared)
    for p in panels:
        want = declared[p["title"]]
        if p["type"] == "timeseries":
            assert p["options"]["legend"] == {**p["options"]["legend"], "showLegend": True, "displayMode": "list"}
        else:
            assert p["type"] == "stat" and p["options"]["reduceOptions"]["calcs"] == ["lastNotNull"]
        defaults = p["fieldConfig"]["defaults"]
        assert defaults["unit"] == want.unit and defaults.get("min") == want.min and defaults.get("max") == want.max
        assert [(t["expr"], t["legendFormat"]) for t in p["targets"]] == want.targets, p["title"]


def test_provisioning_matches_the_compose_mounts():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash_dir = mounts["./deploy/grafana/dashboards"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "rlhf.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == dash_dir
    home = compose["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dash_dir + "/") and (GRAFANA / "dashboards" / Path(home).name).exists()

    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["uid"] for d in ds if d.get("isDefault")] == ["prometheus"]
    assert ds[0]["url"] == "${PROMETHEUS_URL}" and compose["environment"]["PROMETHEUS_URL"] == "http://prometheus:9090"
