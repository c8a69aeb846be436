#!/usr/bin/env python3
"""Checks the Helm chart helm/crm with a real Helm engine, offline.

Renders the chart (the `helm` binary when it is on PATH, otherwise Helm 4 as a library through
the PyPI package helm-python-sdk) for its default values, for ci/production-values.yaml and for
an edge case (TLS only, Gateway API routes, a service run elsewhere); lints it strictly; checks
every rendered object against the Kubernetes OpenAPI schemas of 1.29 and of the newest version
kubernetes-validate ships (the Prometheus Operator and Gateway API kinds, which it has no schema
for, by hand, and the alert rules with promtool when it is on PATH); checks the Grafana
dashboards; asserts what the chart promises for each enabled service (Deployment with gRPC
probes and a hardened security context, headless and client Services, HPA, PDB, NetworkPolicy,
migration hook Job…); and checks that wrong values fail the values schema.

    python3 -m pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML
    python3 tests/peers/chart_check.py [--engine auto|cli|sdk] [--chart helm/crm]

Prints one JSON summary line (the failures, if any, also on stderr) and exits non-zero on any
failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RELEASE = "crm"
NAMESPACE = "crm"
ROLES = ["auth", "contacts", "deals", "gateway", "notifications", "tasks"]
DB_ROLES = {"auth", "contacts", "notifications", "tasks", "deals"}
KUBE_OLDEST = "1.29.0"
# Kinds kubernetes-validate has no schema for: checked by hand below.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"),
}
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
PROM_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")

# An edge case beside the two values files: TLS-only ports (HTTPS probes), Gateway API routes,
# deals run outside the release, a fullname override, tracing on.
EDGE_VALUES: dict[str, Any] = {
    "fullnameOverride": "acme",
    "tls": {"enabled": True, "secretName": "acme-tls", "only": True, "peersCA": True},
    "gatewayApi": {
        "enabled": True,
        "parentRefs": [{"name": "public", "namespace": "gateways"}],
        "hostnames": ["crm.example.org"],
        "httpRoute": {"enabled": True},
        "grpcRoute": {"enabled": True},
    },
    "config": {"otel": {"endpoint": "http://collector:4317"}, "gateway": {"rateLimitUser": "50/s:100"}},
    "secrets": {"smtpPassword": "smtp-secret", "serviceClientSecret": "x" * 40, "adminPassword": "correct horse"},
    "services": {
        "deals": {"enabled": False, "addr": "deals.elsewhere.svc:50056"},
        "gateway": {"replicas": 2, "podDisruptionBudget": {"maxUnavailable": "50%"}, "env": {"RUST_LOG": "info"}},
    },
    "networkPolicy": {"gatewayFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateways"}}}]},
    "metrics": {"serviceMonitor": {"enabled": True}},
}

# Values the schema must refuse, each with a fragment of the path its error must name.
BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("replicas as a word", {"services": {"gateway": {"replicas": "three"}}}, "replicas"),
    ("unknown top-level key", {"replicaCount": 3}, "replicaCount"),
    ("unknown service", {"services": {"billing": {"enabled": True, "replicas": 1, "port": 1}}}, "billing"),
    ("port out of range", {"services": {"contacts": {"port": 70000}}}, "port"),
    ("unknown SMTP TLS mode", {"config": {"smtp": {"tls": "ssl"}}}, "tls"),
    ("short service client secret", {"secrets": {"serviceClientSecret": "short"}}, "serviceClientSecret"),
    ("both PDB bounds", {"services": {"auth": {"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}}}},
     "podDisruptionBudget"),
    ("drain delay not a duration", {"config": {"drainDelay": "soon"}}, "drainDelay"),
]


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, scenario: str, message: str) -> None:
        self.items.append(f"[{scenario}] {message}")

    def check(self, condition: Any, scenario: str, message: str) -> bool:
        if not condition:
            self.add(scenario, message)
        return bool(condition)


# --- engines ---------------------------------------------------------------------------------


class CliEngine:
    """The `helm` binary."""

    def __init__(self, chart: Path) -> None:
        self.chart = chart
        version = subprocess.run(["helm", "version", "--short"], capture_output=True, text=True)
        self.name = f"helm CLI {version.stdout.strip()}"

    def _values_file(self, values: dict[str, Any], tmp: str) -> str:
        path = os.path.join(tmp, "values.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(values, f)
        return path

    def render(self, values: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run(
                ["helm", "template", RELEASE, str(self.chart), "--namespace", NAMESPACE,
                 "-f", self._values_file(values, tmp)],
                capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(run.stderr.strip() or run.stdout.strip())
        return parse_documents(run.stdout), None  # `helm template` does not render NOTES.txt

    def lint(self, values: dict[str, Any], kube_version: str) -> list[str]:
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run(
                ["helm", "lint", "--strict", str(self.chart), "--namespace", NAMESPACE,
                 "--kube-version", kube_version, "-f", self._values_file(values, tmp)],
                capture_output=True, text=True)
        return [] if run.returncode == 0 else [(run.stdout + run.stderr).strip()]

    def refused(self, values: dict[str, Any]) -> str | None:
        """The error when values are refused, None when they render."""
        try:
            self.render(values)
        except RuntimeError as e:
            return str(e)
        return None


class SdkEngine:
    """Helm 4 as a library (helm-python-sdk): the same loader, engine, schema check and linter."""

    def __init__(self, chart: Path) -> None:
        import helm_python

        self.helm = helm_python
        self.chart_path = chart
        self.chart = helm_python.Chart.load(str(chart))
        self.name = f"helm-python-sdk {helm_python.__version__} (Helm {helm_python.helm_sdk_version()})"

    def render(self, values: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
        try:
            rendered = self.chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except self.helm.HelmError as e:
            raise RuntimeError(str(e)) from e
        notes = None
        docs: list[dict[str, Any]] = []
        for path in sorted(rendered):
            if path.endswith("NOTES.txt"):
                notes = rendered[path]
            else:
                docs.extend(parse_documents(rendered[path], source=path))
        return docs, notes

    def lint(self, values: dict[str, Any], kube_version: str) -> list[str]:
        report = self.helm.lint(str(self.chart_path), values, strict=True, namespace=NAMESPACE,
                                kube_version=f"v{kube_version}")
        problems = [f"{m['path']}: {m['error'].strip()}" for m in report.get("messages", []) if m["severity"] >= 2]
        return problems + [e.strip() for e in report.get("errors", []) if e.strip() not in "".join(problems)]

    def refused(self, values: dict[str, Any]) -> str | None:
        try:
            self.chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except self.helm.HelmValuesError as e:
            return str(e)
        except self.helm.HelmError as e:  # refused, but not by the schema
            return f"(not a values error) {e}"
        return None


def parse_documents(text: str, source: str = "") -> list[dict[str, Any]]:
    docs = []
    for doc in yaml.safe_load_all(text):
        if doc:
            if not isinstance(doc, dict):
                raise RuntimeError(f"{source}: a document that is not a mapping: {doc!r:.80}")
            docs.append(doc)
    return docs


def deep_merge(base: Any, override: Any) -> Any:
    """Helm's coalescing of a values file over the defaults (maps merge, null deletes)."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return copy.deepcopy(override)
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --- Kubernetes schemas and the custom kinds ---------------------------------------------------


def validate_kubernetes(docs: list[dict[str, Any]], versions: list[str], scenario: str, failures: Failures,
                        stats: Counter) -> list[dict[str, Any]]:
    """Validates each object for each version; returns the custom-kind objects left to check by hand."""
    from kubernetes_validate import utils as kv

    custom = []
    for doc in docs:
        kind, api = doc.get("kind"), doc.get("apiVersion")
        name = f"{kind}/{doc.get('metadata', {}).get('name')}"
        if (api, kind) in CRD_KINDS:
            custom.append(doc)
            continue
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
                stats["schema_validations"] += 1
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                failures.add(scenario, f"{name} invalid for Kubernetes {version}: {path}: {e.message}")
            except kv.SchemaNotFoundError:
                failures.add(scenario, f"{name}: no Kubernetes {version} schema for {api} {kind}")
    return custom


def check_metadata(doc: dict[str, Any], scenario: str, failures: Failures) -> None:
    meta = doc.get("metadata")
    name = f"{doc.get('kind')}/{meta.get('name') if isinstance(meta, dict) else '?'}"
    if not failures.check(isinstance(meta, dict), scenario, f"{name}: metadata is not a mapping"):
        return
    failures.check(isinstance(meta.get("name"), str) and DNS_SUBDOMAIN.match(meta["name"]) and len(meta["name"]) <= 63,
                   scenario, f"{name}: name is not a DNS name of at most 63 characters")
    failures.check(meta.get("namespace") == NAMESPACE, scenario, f"{name}: namespace {meta.get('namespace')!r}")
    for key, value in (meta.get("labels") or {}).items():
        failures.check(isinstance(value, str) and len(value) <= 63 and LABEL_VALUE.match(value), scenario,
                       f"{name}: label {key}={value!r} is not a valid label value")
    for key, value in (meta.get("annotations") or {}).items():
        failures.check(isinstance(value, str), scenario, f"{name}: annotation {key} is not a string")


def check_custom(custom: list[dict[str, Any]], docs: list[dict[str, Any]], scenario: str, failures: Failures,
                 stats: Counter, promtool: dict[str, Any]) -> None:
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for doc in custom:
        check_metadata(doc, scenario, failures)
        stats["custom_kinds_checked"] += 1
        kind, spec, name = doc["kind"], doc.get("spec") or {}, doc["metadata"]["name"]
        failures.check(isinstance(doc.get("spec"), dict) and doc["spec"], scenario, f"{kind}/{name}: no spec")
        if kind == "ServiceMonitor":
            selector = (spec.get("selector") or {}).get("matchLabels") or {}
            matched = [s for s in services.values() if selector.items() <= (s["metadata"].get("labels") or {}).items()]
            if failures.check(len(matched) == 1, scenario, f"ServiceMonitor/{name} selects {len(matched)} Services"):
                port_names = {p.get("name") for p in matched[0]["spec"]["ports"]}
                for endpoint in spec.get("endpoints") or []:
                    failures.check(endpoint.get("port") in port_names, scenario,
                                   f"ServiceMonitor/{name}: no port {endpoint.get('port')} on {matched[0]['metadata']['name']}")
                    failures.check(endpoint.get("path") == "/metrics", scenario, f"ServiceMonitor/{name}: path")
                    for key in ("interval", "scrapeTimeout"):
                        failures.check(PROM_DURATION.match(str(endpoint.get(key, "30s"))), scenario,
                                       f"ServiceMonitor/{name}: {key} is not a duration")
            failures.check(spec.get("endpoints"), scenario, f"ServiceMonitor/{name}: no endpoints")
        elif kind == "PrometheusRule":
            groups = spec.get("groups") or []
            failures.check(groups, scenario, f"PrometheusRule/{name}: no groups")
            names = [g.get("name") for g in groups]
            failures.check(len(names) == len(set(names)), scenario, f"PrometheusRule/{name}: duplicate group names")
            alerts = set()
            for group in groups:
                for rule in group.get("rules") or []:
                    label = rule.get("alert") or rule.get("record")
                    alerts.add(label)
                    failures.check(label and isinstance(rule.get("expr"), str) and rule["expr"].strip(), scenario,
                                   f"PrometheusRule/{name}: rule {label!r} without alert/record or expr")
                    failures.check(rule["expr"].count("(") == rule["expr"].count(")")
                                   and rule["expr"].count("{") == rule["expr"].count("}"), scenario,
                                   f"PrometheusRule/{name}: {label}: unbalanced brackets")
                    if "for" in rule:
                        failures.check(PROM_DURATION.match(str(rule["for"])), scenario, f"{label}: 'for' is not a duration")
                    for part in ("labels", "annotations"):
                        failures.check(all(isinstance(v, str) for v in (rule.get(part) or {}).values()), scenario,
                                       f"PrometheusRule/{name}: {label}: {part} values must be strings")
            expected = {"rpc_server_call_duration_seconds_count", "rpc_server_call_duration_seconds_bucket",
                        "crm_events_outbox_oldest_age_seconds", "crm_events_consumer_lag", "crm_events_dead_lettered_total",
                        "crm_gateway_upstream_up", "crm_gateway_rate_limited_total"}
            exprs = " ".join(r["expr"] for g in groups for r in g.get("rules") or [])
            for metric in sorted(expected):
                failures.check(metric in exprs, scenario, f"PrometheusRule/{name}: no alert on {metric}")
            run_promtool(groups, scenario, failures, promtool)
        elif kind in ("HTTPRoute", "GRPCRoute"):
            failures.check(spec.get("parentRefs") and all(isinstance(p, dict) and p.get("name") for p in spec["parentRefs"]),
                           scenario, f"{kind}/{name}: parentRefs without names")
            for rule in spec.get("rules") or []:
                for ref in rule.get("backendRefs") or []:
                    target = services.get(ref.get("name"))
                    if failures.check(target, scenario, f"{kind}/{name}: backend {ref.get('name')} is not rendered"):
                        failures.check(ref.get("port") in [p["port"] for p in target["spec"]["ports"]], scenario,
                                       f"{kind}/{name}: backend port {ref.get('port')}")
            failures.check(spec.get("rules"), scenario, f"{kind}/{name}: no rules")


def run_promtool(groups: list[dict[str, Any]], scenario: str, failures: Failures, promtool: dict[str, Any]) -> None:
    binary = shutil.which("promtool")
    if not binary:
        promtool["status"] = "skipped: promtool not on PATH"
        return
    with tempfile.NamedTemporaryFile("w", suffix=".rules.yaml", delete=False) as f:
        yaml.safe_dump({"groups": groups}, f)
        path = f.name
    try:
        run = subprocess.run([binary, "check", "rules", path], capture_output=True, text=True)
    finally:
        os.unlink(path)
    promtool.setdefault("runs", 0)
    promtool["runs"] += 1
    if run.returncode == 0:
        promtool["status"] = "passed"
        summary = re.search(r"SUCCESS: (\d+) rules found", run.stdout + run.stderr)
        if summary:
            promtool["rules"] = int(summary.group(1))
    else:
        promtool["status"] = "failed"
        failures.add(scenario, f"promtool check rules: {(run.stdout + run.stderr).strip()}")


# --- dashboards ----------------------------------------------------------------------------------


def check_dashboards(docs: list[dict[str, Any]], values: dict[str, Any], scenario: str, failures: Failures,
                     stats: Counter) -> None:
    d = values["dashboards"]
    maps = [x for x in docs if x["kind"] == "ConfigMap" and (x["metadata"].get("labels") or {}).get(d["label"]) is not None]
    if not d["enabled"]:
        failures.check(not maps, scenario, "dashboards rendered although dashboards.enabled is false")
        return
    failures.check(maps, scenario, "no dashboard ConfigMap")
    uids = []
    for cm in maps:
        name = cm["metadata"]["name"]
        failures.check(cm["metadata"]["labels"][d["label"]] == d["labelValue"], scenario, f"{name}: label value")
        for key, text in (cm.get("data") or {}).items():
            try:
                board = json.loads(text)
            except json.JSONDecodeError as e:
                failures.add(scenario, f"{name}/{key}: not JSON: {e}")
                continue
            stats["dashboards"] += 1
            uids.append(board.get("uid"))
            failures.check(board.get("title") and board.get("uid"), scenario, f"{name}/{key}: no title or uid")
            panels = [p for p in board.get("panels") or [] if p.get("type") != "row"]
            failures.check(panels, scenario, f"{name}/{key}: no panels")
            ids = [p.get("id") for p in board.get("panels") or []]
            failures.check(len(ids) == len(set(ids)), scenario, f"{name}/{key}: duplicate panel ids")
            for panel in panels:
                stats["dashboard_panels"] += 1
                targets = panel.get("targets") or []
                failures.check(targets and all(t.get("expr") for t in targets), scenario,
                               f"{name}/{key}: panel {panel.get('title')!r} has no query")
                failures.check(isinstance(panel.get("gridPos"), dict), scenario, f"{name}/{key}: panel without gridPos")
                for target in targets:
                    expr = target.get("expr", "")
                    failures.check(expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), scenario,
                                   f"{name}/{key}: unbalanced query {expr!r:.60}")
    failures.check(len(uids) == len(set(uids)), scenario, "dashboards share a uid")
    text = json.dumps([cm.get("data") for cm in maps])
    for metric in ("rpc_server_call_duration_seconds_", "crm_gateway_upstream_up", "db_client_connection_count",
                   "crm_events_outbox_backlog", "crm_events_consumer_lag", "crm_events_dead_lettered_total", "crm_jobs_"):
        failures.check(metric in text, scenario, f"no dashboard shows {metric}")
    for label in ("crm_role", "rpc_service", "rpc_method", "rpc_grpc_status_code"):
        failures.check(label in text, scenario, f"no dashboard breaks calls down by {label}")


# --- what the chart promises ---------------------------------------------------------------------


def fullname(values: dict[str, Any]) -> str:
    if values.get("fullnameOverride"):
        return values["fullnameOverride"][:63].rstrip("-")
    name = values.get("nameOverride") or "crm"
    return (RELEASE if name in RELEASE else f"{RELEASE}-{name}")[:63].rstrip("-")


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", duration.strip())
    if not match:
        raise ValueError(duration)
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return int(match.group(1)) * scale


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= (labels or {}).items()


def check_promises(docs: list[dict[str, Any]], notes: str | None, values: dict[str, Any], scenario: str,
                   failures: Failures, stats: Counter) -> None:
    f = failures
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        f.check(doc["metadata"]["name"] not in by_kind.get(doc["kind"], {}), scenario, f"{key} rendered twice")
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
        if (doc.get("apiVersion"), doc.get("kind")) not in CRD_KINDS:
            check_metadata(doc, scenario, f)

    get = lambda kind, name: by_kind.get(kind, {}).get(name)  # noqa: E731
    full = fullname(values)
    tls = values["tls"]
    tls_only = tls["enabled"] and tls["only"]
    existing = values["existingSecret"]
    secret_name = existing or f"{full}-secrets"
    secret = get("Secret", secret_name)
    drain = seconds(values["config"]["drainDelay"])
    configmap = get("ConfigMap", f"{full}-config")
    f.check(configmap, scenario, "no shared ConfigMap")
    config = (configmap or {}).get("data") or {}

    if existing:
        f.check(secret is None, scenario, "a Secret rendered although existingSecret is set")
    elif f.check(secret, scenario, f"no Secret {secret_name}"):
        hook = secret["metadata"].get("annotations") or {}
        f.check({"pre-install", "pre-upgrade"} <= set(hook.get("helm.sh/hook", "").split(",")), scenario,
                "the Secret is not a pre-install,pre-upgrade hook (the migration Jobs read it)")
    secret_keys = set((secret or {}).get("data") or {})

    sa_name = values["serviceAccount"]["name"] or full
    if values["serviceAccount"]["create"]:
        f.check(get("ServiceAccount", sa_name), scenario, f"no ServiceAccount {sa_name}")

    enabled = [r for r in ROLES if values["services"][r]["enabled"]]
    f.check(set(enabled) | {r for r in ROLES if values["services"][r].get("addr")} == set(ROLES), scenario,
            "a disabled service has no addr: the others cannot reach it")
    for role in ROLES:
        svc = values["services"][role]
        addr = config.get(f"CRM_{role.upper()}_ADDR")
        if svc["enabled"]:
            f.check(addr == f"{full}-{role}-headless:{svc['port']}", scenario,
                    f"CRM_{role.upper()}_ADDR is {addr!r}, not the headless Service")
        else:
            f.check(addr == svc["addr"], scenario, f"CRM_{role.upper()}_ADDR is {addr!r}, not services.{role}.addr")
            f.check(get("Deployment", f"{full}-{role}") is None, scenario, f"{role} is disabled but has a Deployment")

    for role in enabled:
        svc = values["services"][role]
        name = f"{full}-{role}"
        port = svc["port"]
        stats["services_checked"] += 1
        dep = get("Deployment", name)
        if not f.check(dep, scenario, f"no Deployment {name}"):
            continue
        pod = dep["spec"]["template"]
        pod_labels = pod["metadata"].get("labels") or {}
        f.check(labels_match(dep["spec"]["selector"]["matchLabels"], pod_labels), scenario, f"{name}: selector")
        autoscaled = svc["autoscaling"]["enabled"]
        if autoscaled:
            f.check("replicas" not in dep["spec"], scenario, f"{name}: replicas set although an HPA scales it")
        else:
            f.check(dep["spec"].get("replicas") == svc["replicas"], scenario, f"{name}: replicas")
        checksum = (pod["metadata"].get("annotations") or {}).get("checksum/config", "")
        f.check(re.fullmatch(r"[0-9a-f]{64}", checksum), scenario, f"{name}: no checksum/config annotation")
        spec = pod["spec"]
        f.check(spec.get("terminationGracePeriodSeconds", 30) > drain + 30, scenario,
                f"{name}: terminationGracePeriodSeconds does not exceed the drain delay plus a 30s call")
        psc = spec.get("securityContext") or {}
        f.check(psc.get("runAsNonRoot") is True, scenario, f"{name}: pod not runAsNonRoot")
        f.check(not spec.get("hostNetwork") and not spec.get("hostPID"), scenario, f"{name}: host namespaces")
        if values["serviceAccount"]["create"]:
            f.check(spec.get("serviceAccountName") == sa_name, scenario, f"{name}: service account")
        tsc = spec.get("topologySpreadConstraints") or []
        if values["topologySpread"]["enabled"] and not svc.get("topologySpreadConstraints"):
            keys = {c["topologyKey"] for c in tsc}
            f.check({"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys, scenario, f"{name}: topology spread")
            f.check(all(c["whenUnsatisfiable"] == "ScheduleAnyway" and labels_match(c["labelSelector"]["matchLabels"], pod_labels)
                        for c in tsc), scenario, f"{name}: topology spread must prefer, and select its own pods")
        containers = spec["containers"]
        f.check(len(containers) == 1, scenario, f"{name}: one container expected")
        c = containers[0]
        f.check(c.get("args", [])[:2] == ["serve", role], scenario, f"{name}: does not run `crm serve {role}`")
        image = values["image"]
        want = f"{image['repository']}@{image['digest']}" if image.get("digest") else f"{image['repository']}:{image.get('tag') or '0.1.0'}"
        if not svc.get("image"):
            f.check(c.get("image") == want, scenario, f"{name}: image {c.get('image')} is not {want}")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        f.check(port in ports.values(), scenario, f"{name}: container does not expose {port}")
        sc = c.get("securityContext") or {}
        f.check(sc.get("readOnlyRootFilesystem") is True, scenario, f"{name}: root filesystem writable")
        f.check(sc.get("allowPrivilegeEscalation") is False, scenario, f"{name}: privilege escalation allowed")
        f.check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), scenario, f"{name}: capabilities not dropped")
        f.check(sc.get("runAsNonRoot") is True or psc.get("runAsNonRoot") is True, scenario, f"{name}: may run as root")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        f.check(seccomp == "RuntimeDefault", scenario, f"{name}: seccomp profile {seccomp}")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        f.check("/tmp" in mounts and "emptyDir" in volumes.get(mounts["/tmp"] if "/tmp" in mounts else "", {}), scenario,
                f"{name}: no emptyDir at /tmp")

        # Probes: native gRPC health for startup and readiness (HTTPS /readyz when the port
        # refuses plaintext), /healthz for liveness.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = c.get(probe)
            if not f.check(p, scenario, f"{name}: no {probe}"):
                continue
            if tls_only:
                http = p.get("httpGet") or {}
                f.check(http.get("scheme") == "HTTPS" and http.get("port") == port, scenario,
                        f"{name}: {probe} must use HTTPS on {port} when the port refuses plaintext")
            elif probe == "livenessProbe":
                ok = (p.get("grpc") or {}).get("port") == port or (p.get("httpGet") or {}).get("path") == "/healthz"
                f.check(ok, scenario, f"{name}: livenessProbe must ask gRPC health or /healthz on {port}")
            else:
                f.check((p.get("grpc") or {}).get("port") == port, scenario, f"{name}: {probe} is not a gRPC probe on {port}")

        # Environment: its own listen address, the Secret's keys, TLS files.
        env = {e["name"]: e for e in c.get("env", [])}
        listen = env.get(f"CRM_{role.upper()}_LISTEN", {}).get("value", "")
        f.check(listen.endswith(f":{port}"), scenario, f"{name}: CRM_{role.upper()}_LISTEN is {listen!r}")
        f.check(any((r.get("configMapRef") or {}).get("name") == f"{full}-config" for r in c.get("envFrom", [])), scenario,
                f"{name}: does not read the shared ConfigMap")
        wanted = {"CRM_SERVICE_CLIENT_SECRET": "service-client-secret", "CRM_REDIS_URL": "redis-url"}
        if role in DB_ROLES:
            wanted[f"CRM_{role.upper()}_DATABASE_URL"] = f"{role}-database-url"
        if role == "auth":
            wanted["CRM_ADMIN_PASSWORD"] = "admin-password"
        for var, key in wanted.items():
            ref = ((env.get(var) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            f.check(ref.get("name") == secret_name and ref.get("key") == key, scenario, f"{name}: {var} is not read from {secret_name}/{key}")
        for var, e in env.items():
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref and not existing:
                f.check(ref["name"] == secret_name, scenario, f"{name}: {var} reads another Secret {ref['name']}")
                f.check(ref.get("optional") or ref["key"] in secret_keys, scenario,
                        f"{name}: {var} reads {ref['key']}, which the Secret lacks")
            f.check("value" not in e or isinstance(e["value"], str), scenario, f"{name}: {var} value is not a string")
        if tls["enabled"]:
            f.check(env.get("CRM_TLS_CERT") and env.get("CRM_TLS_KEY"), scenario, f"{name}: TLS on, but no CRM_TLS_CERT/KEY")
            tls_volume = [v for v in volumes.values() if (v.get("secret") or {}).get("secretName") == tls["secretName"]]
            f.check(tls_volume and any(m == tls_volume[0]["name"] for m in mounts.values()), scenario,
                    f"{name}: the TLS Secret is not mounted")
            f.check(("CRM_TLS_ONLY" in env) == bool(tls["only"]), scenario, f"{name}: CRM_TLS_ONLY")
        else:
            f.check("CRM_TLS_CERT" not in env, scenario, f"{name}: CRM_TLS_CERT without tls.enabled")

        # Services: headless for discovery, ClusterIP for clients.
        port_name = next((n for n, p in ports.items() if p == port), None)
        for svc_name, headless in ((f"{name}-headless", True), (name, False)):
            s = get("Service", svc_name)
            if not f.check(s, scenario, f"no Service {svc_name}"):
                continue
            f.check(DNS_LABEL.match(svc_name), scenario, f"Service {svc_name} is not a DNS label")
            f.check(labels_match(s["spec"]["selector"], pod_labels), scenario, f"Service {svc_name} does not select {name}'s pods")
            sports = s["spec"]["ports"]
            f.check(len(sports) == 1 and sports[0]["port"] == port and sports[0].get("targetPort") in (port, port_name),
                    scenario, f"Service {svc_name}: port")
            if headless:
                f.check(s["spec"].get("clusterIP") == "None", scenario, f"Service {svc_name} is not headless")
                f.check(s["spec"].get("publishNotReadyAddresses", False) is False, scenario,
                        f"Service {svc_name} publishes unready replicas")
            else:
                f.check(s["spec"].get("clusterIP") != "None" and s["spec"].get("type", "ClusterIP") == "ClusterIP",
                        scenario, f"Service {svc_name} is not a ClusterIP Service")
        others = [d for d in by_kind.get("Deployment", {}).values()
                  if d is not dep and labels_match(get("Service", name)["spec"]["selector"] if get("Service", name) else {},
                                                   d["spec"]["template"]["metadata"].get("labels"))]
        f.check(not others, scenario, f"Service {name} also selects other Deployments")

        hpa = get("HorizontalPodAutoscaler", name)
        if autoscaled:
            if f.check(hpa, scenario, f"no HPA {name}"):
                a = svc["autoscaling"]
                f.check(hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                        scenario, f"HPA {name}: target")
                f.check(hpa["spec"]["minReplicas"] == a["minReplicas"] and hpa["spec"]["maxReplicas"] == a["maxReplicas"],
                        scenario, f"HPA {name}: bounds")
                metrics = hpa["spec"].get("metrics") or []
                f.check(any(m.get("type") == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
                        == bool(a.get("targetCPUUtilizationPercentage")), scenario, f"HPA {name}: CPU metric")
                f.check(len(metrics) == bool(a.get("targetCPUUtilizationPercentage")) + len(a.get("metrics") or []),
                        scenario, f"HPA {name}: custom metrics not all there")
        else:
            f.check(hpa is None, scenario, f"HPA {name} rendered although autoscaling is off")

        pdb = get("PodDisruptionBudget", name)
        if autoscaled or svc["replicas"] > 1:
            if f.check(pdb, scenario, f"no PDB {name} ({svc['replicas']} replicas)"):
                f.check(labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels), scenario, f"PDB {name}: selector")
                bounds = {k for k in ("minAvailable", "maxUnavailable") if k in pdb["spec"]}
                f.check(len(bounds) == 1, scenario, f"PDB {name}: exactly one of minAvailable/maxUnavailable")
                wanted_pdb = svc.get("podDisruptionBudget") or {}
                for k, v in wanted_pdb.items():
                    f.check(pdb["spec"].get(k) == v, scenario, f"PDB {name}: {k}")
        else:
            f.check(pdb is None, scenario, f"PDB {name} with a single replica would block node drains")

        np = get("NetworkPolicy", name)
        if values["networkPolicy"]["enabled"]:
            if f.check(np, scenario, f"no NetworkPolicy {name}"):
                nspec = np["spec"]
                f.check(labels_match(nspec["podSelector"]["matchLabels"], pod_labels), scenario, f"NetworkPolicy {name}: selector")
                f.check(set(nspec.get("policyTypes", [])) == {"Ingress", "Egress"}, scenario, f"NetworkPolicy {name}: policy types")
                ingress = nspec.get("ingress") or []
                f.check(any(port in [p.get("port") for p in r.get("ports", [])] for r in ingress), scenario,
                        f"NetworkPolicy {name}: its port is closed")
                if role != "gateway":
                    for rule in ingress[:1]:
                        f.check(rule.get("from"), scenario, f"NetworkPolicy {name}: open to anyone")
                egress = nspec.get("egress") or []
                f.check(any(53 in [p.get("port") for p in r.get("ports", [])] and "UDP" in [p.get("protocol") for p in r["ports"]]
                            for r in egress), scenario, f"NetworkPolicy {name}: no DNS egress")
                peer_ports = {values["services"][r]["port"] for r in enabled}
                f.check(any(peer_ports <= {p.get("port") for p in r.get("ports", [])} for r in egress), scenario,
                        f"NetworkPolicy {name}: cannot reach the other services")
                needs = [values["networkPolicy"]["egress"]["redis"]["ports"][0]]
                if role in DB_ROLES:
                    needs.append(values["networkPolicy"]["egress"]["database"]["ports"][0])
                for need in needs:
                    f.check(any(need in [p.get("port") for p in r.get("ports", [])] for r in egress), scenario,
                            f"NetworkPolicy {name}: no egress to port {need}")
        else:
            f.check(np is None, scenario, f"NetworkPolicy {name} although networkPolicy.enabled is false")

        job = get("Job", f"{name}-migrate")
        if role in DB_ROLES and values["migrations"]["enabled"]:
            if f.check(job, scenario, f"no migration Job for {role}"):
                ann = job["metadata"].get("annotations") or {}
                f.check(set(ann.get("helm.sh/hook", "").split(",")) == {"pre-install", "pre-upgrade"}, scenario,
                        f"Job {name}-migrate: not a pre-install,pre-upgrade hook")
                f.check({"before-hook-creation", "hook-succeeded"} <= set(ann.get("helm.sh/hook-delete-policy", "").split(",")),
                        scenario, f"Job {name}-migrate: hook-delete-policy")
                if secret is not None:
                    sw = int((secret["metadata"].get("annotations") or {}).get("helm.sh/hook-weight", "0"))
                    f.check(sw < int(ann.get("helm.sh/hook-weight", "0")), scenario,
                            f"Job {name}-migrate runs before (or with) the Secret it reads")
                jc = job["spec"]["template"]["spec"]["containers"][0]
                f.check(jc.get("args") == ["migrate", role], scenario, f"Job {name}-migrate: not `crm migrate {role}`")
                jenv = {e["name"]: e for e in jc.get("env", [])}
                ref = ((jenv.get("CRM_DATABASE_URL") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
                f.check(ref.get("name") == secret_name and ref.get("key") == f"{role}-database-url", scenario,
                        f"Job {name}-migrate: CRM_DATABASE_URL not from {secret_name}/{role}-database-url")
                if not existing:
                    f.check(f"{role}-database-url" in secret_keys, scenario, f"the Secret lacks {role}-database-url")
                jsc = jc.get("securityContext") or {}
                f.check(jsc.get("readOnlyRootFilesystem") and jsc.get("allowPrivilegeEscalation") is False, scenario,
                        f"Job {name}-migrate: not hardened")
                f.check(job["spec"]["template"]["spec"].get("restartPolicy") in ("Never", "OnFailure"), scenario,
                        f"Job {name}-migrate: restartPolicy")
        else:
            f.check(job is None, scenario, f"a migration Job for {role}, which has no database")

    # Extras, each only when asked for.
    gw = f"{full}-gateway"
    ingress = get("Ingress", gw)
    if values["ingress"]["enabled"]:
        if f.check(ingress, scenario, "ingress.enabled but no Ingress"):
            for rule in ingress["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    f.check(backend["name"] == gw and backend["port"]["number"] == values["services"]["gateway"]["port"],
                            scenario, "the Ingress does not lead to the gateway's Service")
    else:
        f.check(ingress is None, scenario, "an Ingress although ingress.enabled is false")
    gapi = values["gatewayApi"]
    f.check(bool(by_kind.get("HTTPRoute")) == bool(gapi["enabled"] and gapi["httpRoute"]["enabled"]), scenario, "HTTPRoute")
    f.check(bool(by_kind.get("GRPCRoute")) == bool(gapi["enabled"] and gapi["grpcRoute"]["enabled"]), scenario, "GRPCRoute")
    sm = values["metrics"]["serviceMonitor"]["enabled"]
    f.check(len(by_kind.get("ServiceMonitor", {})) == (len(enabled) if sm else 0), scenario, "one ServiceMonitor per service")
    f.check(bool(by_kind.get("PrometheusRule")) == bool(values["metrics"]["prometheusRule"]["enabled"]), scenario, "PrometheusRule")

    if notes is not None:
        stats["notes_checked"] += 1
        f.check(f"port-forward svc/{gw}" in notes and "crm login --server" in notes, scenario,
                "NOTES.txt does not tell how to reach the gateway and sign in")
        f.check(existing in notes if existing else "admin-password" in notes or values["secrets"]["adminPassword"], scenario,
                "NOTES.txt does not tell where the admin password is")


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chart", default=str(ROOT / "helm" / "crm"))
    parser.add_argument("--engine", choices=["auto", "cli", "sdk"], default="auto")
    parser.add_argument("--require-promtool", action="store_true",
                        help="fail when promtool is not on PATH (CI installs it)")
    args = parser.parse_args()
    chart = Path(args.chart).resolve()
    failures = Failures()
    stats: Counter = Counter()
    promtool: dict[str, Any] = {"status": "not run: no PrometheusRule rendered"}
    summary: dict[str, Any] = {"check": "helm chart", "chart": str(chart.relative_to(ROOT) if chart.is_relative_to(ROOT) else chart)}

    try:
        from kubernetes_validate import utils as kv
        import kubernetes_validate

        latest = kv.latest_version()
        versions = [KUBE_OLDEST, latest]
        summary["kubernetes_validate"] = kubernetes_validate.__version__ if hasattr(kubernetes_validate, "__version__") else "?"
        summary["kubernetes_versions"] = [v.rsplit(".", 1)[0] for v in versions]
        use_cli = args.engine == "cli" or (args.engine == "auto" and shutil.which("helm"))
        engine: CliEngine | SdkEngine = CliEngine(chart) if use_cli else SdkEngine(chart)
        summary["engine"] = engine.name
    except ImportError as e:
        summary.update(ok=False, failures=[f"missing Python package: {e.name} "
                                           "(pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0)"])
        print(json.dumps(summary))
        return 2

    defaults = yaml.safe_load((chart / "values.yaml").read_text())
    scenarios = [("default", {}), ("production", yaml.safe_load((chart / "ci" / "production-values.yaml").read_text())),
                 ("edge", EDGE_VALUES)]
    summary["scenarios"] = {}
    for scenario, override in scenarios:
        values = deep_merge(defaults, override)
        for version in versions:
            for problem in engine.lint(override, version):
                failures.add(scenario, f"helm lint --strict (Kubernetes {version}): {problem}")
        try:
            docs, notes = engine.render(override)
        except RuntimeError as e:
            failures.add(scenario, f"render failed: {e}")
            continue
        custom = validate_kubernetes(docs, versions, scenario, failures, stats)
        check_custom(custom, docs, scenario, failures, stats, promtool)
        check_dashboards(docs, values, scenario, failures, stats)
        check_promises(docs, notes, values, scenario, failures, stats)
        summary["scenarios"][scenario] = {"objects": len(docs), "kinds": dict(sorted(Counter(d["kind"] for d in docs).items()))}

    refused = {}
    for label, bad, fragment in BAD_VALUES:
        error = engine.refused(bad)
        if error is None:
            failures.add("schema", f"{label}: {json.dumps(bad)} was accepted")
        elif error.startswith("(not a values error)") or fragment not in error:
            failures.add("schema", f"{label}: refused, but not by the schema for {fragment}: {error.strip()[:300]}")
        else:
            refused[label] = True
    summary["schema_refusals"] = f"{len(refused)}/{len(BAD_VALUES)}"
    summary["promtool"] = promtool
    if args.require_promtool and promtool.get("status") != "passed":
        failures.add("promtool", f"the alert rules were not checked with promtool: {promtool.get('status')}")
    summary.update(stats)
    summary["ok"] = not failures.items
    summary["failures"] = failures.items[:50]
    for item in failures.items:
        print(f"FAIL {item}", file=sys.stderr)
    print(json.dumps(summary, sort_keys=False))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
