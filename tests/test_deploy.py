"""The shipped dashboard, alert rules, scrape config and compose services: valid, and about real metrics.

Every metric a dashboard panel or an alert rule names must be one a running control plane
exports; the rules must pass ``promtool check rules`` and their unit tests (``promtool test
rules``), and every dashboard query must be valid PromQL (checked by promtool as recording rules).
promtool comes from Debian's ``prometheus`` package (``.ci/run`` installs it): in CI a missing
promtool fails these tests, elsewhere it skips them and the structural checks still run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from tests._gateway_helpers import asgi_transport
from tests._helpers import ROOT, config_for_test
from tests._metrics_helpers import parse, plane_with_registry, scrape
from valkyrie import Client, Settings
from valkyrie.config.live import LiveConfig
from valkyrie.gateway import create_app
from valkyrie.runtime.metric_catalogue import CATALOGUE, exposed_names
from valkyrie.testing import SimulatedRunner

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "valkyrie.json"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = ROOT / "compose.yaml"
#: metrics Prometheus makes itself about each target
BUILT_IN = {"up"}
_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w$.:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, ranges, grouping removed)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = _GROUPING.sub("", text)
    return {n for n in _IDENT.findall(text) if n.lower() not in _KEYWORDS}


def dashboard_exprs() -> list[str]:
    """Every query of every panel (Grafana's ``$__rate_interval`` made a fixed range)."""
    board = json.loads(DASHBOARD.read_text())
    found: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            found.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(board["panels"])
    return [e.replace("$__rate_interval", "5m") for e in found]


def rule_exprs() -> list[str]:
    """Every alert rule's expression."""
    rules = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def catalogue_series() -> dict[str, str]:
    """Every series name a scrape can show -> the metric (family) it belongs to."""
    return {series: s.name for s in CATALOGUE for series in exposed_names(s)}


def used_metrics() -> set[str]:
    return {n for e in dashboard_exprs() + rule_exprs() for n in metric_names(e)}


def test_the_promql_name_extractor() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, job_type) (rate(valkyrie_x_bucket{a="b,c"}[5m]))) '
        "> 60 and on() max(valkyrie_y) unless up{job=~'v.*'} offset 5m"
    )
    assert metric_names(expr) == {"valkyrie_x_bucket", "valkyrie_y", "up"}


def test_the_dashboard_and_rules_name_only_catalogue_metrics() -> None:
    known = catalogue_series()
    used = used_metrics()
    unknown = sorted(used - set(known) - BUILT_IN)
    assert not unknown, f"not in the metrics catalogue: {unknown}"
    # and they cover the catalogue's essentials: queue, latency, runners, failures, health
    families = {known[n] for n in used if n in known}
    for essential in (
        "valkyrie_queue_depth_jobs",
        "valkyrie_queue_oldest_age_seconds",
        "valkyrie_job_dispatch_latency_seconds",
        "valkyrie_job_start_latency_seconds",
        "valkyrie_runners",
        "valkyrie_runners_lost",
        "valkyrie_dead_letters",
        "valkyrie_mode",
        "valkyrie_slo_breaches",
        "valkyrie_health_status",
    ):
        assert essential in families, f"no panel or rule shows {essential}"


def test_the_dashboard_is_well_formed() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "valkyrie"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uids = {d["uid"] for d in datasources["datasources"]}
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["title"], panel["id"]
        assert panel.get("description"), panel["id"]
        assert panel["datasource"]["uid"] in uids
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24
        assert panel["targets"], panel["title"]


def test_the_rules_are_well_formed() -> None:
    rules = yaml.safe_load(RULES.read_text())
    names: list[str] = []
    for group in rules["groups"]:
        assert group["name"].startswith("valkyrie-")
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"Valkyrie[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"]
            assert rule["annotations"]["description"]
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"])
            assert rule["expr"].count("(") == rule["expr"].count(")")
            names.append(rule["alert"])
    assert len(names) == len(set(names))


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus); CI runs this check")
    return found


def _run(*args: str, cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    promtool = _promtool()
    here = RULES.parent
    _run(promtool, "check", "rules", RULES.name, cwd=here)
    _run(promtool, "test", "rules", RULE_TESTS.name, cwd=here)
    _run(promtool, "check", "config", "--syntax-only", SCRAPE.name, cwd=here)


def test_promtool_accepts_every_dashboard_query(tmp_path: Path) -> None:
    promtool = _promtool()
    exprs = dashboard_exprs()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"valkyrie:panel_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    _run(promtool, "check", "rules", path.name, cwd=tmp_path)


def test_compose_runs_prometheus_and_grafana_over_every_valkyrie_process() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for service in ("prometheus", "grafana"):
        for mount in services[service]["volumes"]:
            source = mount.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{service} mounts {source}, which is missing"
    workers = {
        name
        for name, svc in services.items()
        if isinstance(svc.get("command"), list) and svc["command"][:2] == ["valkyrie", "worker"]
    }
    assert workers, "no worker services in compose.yaml"
    for name in workers:
        assert services[name]["environment"]["VALKYRIE_METRICS_HOST"] == "0.0.0.0"
    scrape = yaml.safe_load(SCRAPE.read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    scraped = {n for sd in jobs["valkyrie"]["dns_sd_configs"] for n in sd["names"]}
    assert scraped == workers, "prometheus.yml must scrape every worker service of compose.yaml"
    assert {sd["port"] for sd in jobs["valkyrie"]["dns_sd_configs"]} == {9464}
    gateway_port = int(services["gateway"]["ports"][0].split(":")[1])
    assert jobs["valkyrie-gateway"]["dns_sd_configs"][0]["port"] == gateway_port
    assert jobs["valkyrie-gateway"]["dns_sd_configs"][0]["names"] == ["gateway"]
    assert scrape["rule_files"] == ["alerts.yml"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "valkyrie.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    assert any(m.endswith(f"{path}/valkyrie.json:ro") for m in services["grafana"]["volumes"]), (
        "grafana must mount the dashboard where its provider looks"
    )


@pytest.mark.nats
async def test_every_metric_the_dashboard_and_rules_use_is_exported(settings: Settings) -> None:
    async with (
        plane_with_registry(settings) as (bus, handler_registry),
        anyio.create_task_group() as tg,
    ):
        gateway_registry = CollectorRegistry()
        app = create_app(bus, LiveConfig(config_for_test(settings)), gateway_registry)
        stop = anyio.Event()
        await tg.start(SimulatedRunner(bus, "d1", work_s=0.01).run, stop)
        client = Client(bus)
        verdict = await client.submit({"job_type": "shell", "payload": {"command": ["true"]}})
        assert verdict is not None
        assert verdict.job_id is not None
        await client.wait_for_job(verdict.job_id, timeout_s=15)
        async with httpx.AsyncClient(
            transport=asgi_transport(app), base_url="http://gateway"
        ) as http:
            response = await http.get("/metrics")
        families, _ = scrape(handler_registry)
        gateway_families, _ = parse(response.text)
        exported = families | gateway_families
        known = catalogue_series()
        missing = sorted(n for n in used_metrics() - BUILT_IN if known.get(n, n) not in exported)
        assert not missing, f"used by a panel or rule, not exported by a running plane: {missing}"
        stop.set()
        tg.cancel_scope.cancel()
