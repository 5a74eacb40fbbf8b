#!/usr/bin/env python3
"""Checks what deploys pollcast, without a cluster, a helm binary or a Docker daemon.

The Helm chart under helm/pollcast:

- `helm lint --strict` (Helm's own library, through helm-python-sdk) with the
  default values and every values file under ci/;
- renders the chart with each of them and validates every object against the
  Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors) for
  the oldest and the newest Kubernetes the chart supports; the Prometheus
  operator's kinds, which those schemas lack, get structural checks here;
- checks what the chart promises: non-root read-only pods, probes on /healthz
  and /readyz, edges that drain inside their grace period, Services, PDBs and the
  HPA aimed at the right pods, the region on every pod, no database for edges,
  and only metrics pollcast exports in the alerts and the dashboard;
- checks that values.schema.json refuses values that are wrong.

The Dockerfile: its build context has every workspace member (a new crate left
out would break the image, not the tests), its Rust is at least the workspace's
`rust-version`, and the image it ends with runs the binary as a non-root user.

Exit status 1 and a list of failures when anything is off.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "pollcast"
TELEMETRY = ROOT / "crates" / "pollcast" / "src" / "telemetry.rs"
DOCKERFILE = ROOT / "Dockerfile"
# The chart's kubeVersion floor, and the newest schemas kubernetes-validate has.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}

failures: list[str] = []


def fail(where: str, what: str) -> None:
    failures.append(f"{where}: {what}")


def values_files() -> dict[str, dict]:
    found = {"default values": {}}
    for path in sorted((CHART / "ci").glob("*.yaml")):
        found[f"ci/{path.name}"] = yaml.safe_load(path.read_text()) or {}
    return found


def lint(name: str, values: dict) -> None:
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
    for message in report.get("messages", []):
        # 1 = info; warnings (2) and errors (3) fail a strict lint.
        if message.get("severity", 0) >= 2:
            fail(name, f"lint: {message.get('path')}: {message.get('error')}")
    for error in report.get("errors", []):
        fail(name, f"lint: {error}")


def render(chart: helm.Chart, values: dict) -> list[dict]:
    manifests = chart.render(values, name="pollcast", namespace="pollcast", is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                document.setdefault("metadata", {}).setdefault("annotations", {})
                objects.append(document)
    return objects


def known_metrics() -> set[str]:
    return set(re.findall(r'"(pollcast_[a-z_]+)"', TELEMETRY.read_text()))


def metrics_named(text: str) -> set[str]:
    names = set()
    for name in re.findall(r"pollcast_[a-z_]+", text):
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith(suffix) and not name.endswith("_total"):
                name = name[: -len(suffix)]
        names.add(name)
    return names


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_object_schemas(name: str, objects: list[dict]) -> None:
    for obj in objects:
        kind = obj.get("kind")
        label = f"{name}: {kind}/{obj['metadata'].get('name')}"
        if kind in OPERATOR_KINDS:
            if obj.get("apiVersion") != "monitoring.coreos.com/v1":
                fail(label, "apiVersion must be monitoring.coreos.com/v1")
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                fail(label, f"Kubernetes {version}: {error.message} at {list(error.path)}")


def check_deployments(name: str, values: dict, objects: list[dict]) -> None:
    deployments = by_kind(objects, "Deployment")
    roles = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in deployments}
    api_on = values.get("api", {}).get("enabled", True)
    edge_on = values.get("edge", {}).get("enabled", True)
    if ("api" in roles) != api_on or ("edge" in roles) != edge_on:
        fail(name, f"deployments {sorted(roles)} do not follow api/edge.enabled")
    services = by_kind(objects, "Service")
    pdbs = by_kind(objects, "PodDisruptionBudget")
    for role, deployment in roles.items():
        where = f"{name}: {role}"
        pod = deployment["spec"]["template"]
        spec = pod["spec"]
        labels = pod["metadata"]["labels"]
        if not matches(deployment["spec"]["selector"]["matchLabels"], labels):
            fail(where, "the Deployment's selector does not match its pods")
        if not spec.get("securityContext", {}).get("runAsNonRoot"):
            fail(where, "pods must run as non-root")
        (container,) = spec["containers"]
        security = container.get("securityContext", {})
        if not security.get("readOnlyRootFilesystem") or security.get("allowPrivilegeEscalation") is not False:
            fail(where, "containers must be read-only and unprivileged")
        probes = {
            p: container.get(p, {}).get("httpGet", {}).get("path")
            for p in ("startupProbe", "livenessProbe", "readinessProbe")
        }
        if probes != {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}:
            fail(where, f"probes: {probes}")
        env = {e["name"]: e for e in container.get("env", [])}
        if env.get("POLLCAST_ROLE", {}).get("value") != role:
            fail(where, "POLLCAST_ROLE is not the role")
        region = values.get("region", "")
        if env.get("POLLCAST_REGION", {}).get("value", "") != region:
            fail(where, f"POLLCAST_REGION is not the release's region {region!r}")
        if ("POLLCAST_DATABASE_URL" in env) != (role == "api"):
            fail(where, "only the api has a database")
        if "secretKeyRef" not in env.get("POLLCAST_SECRET", {}).get("valueFrom", {}):
            fail(where, "the token secret must come from a Secret")
        if role == "edge":
            grace = spec["terminationGracePeriodSeconds"]
            pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            # pollcast's own drain takes up to 10 s for WebSockets, then 10 s
            # for HTTP (docs/operations.md, Timeouts), after the pause.
            if grace < pause + 20:
                fail(where, f"grace {grace}s leaves no time to drain after a {pause}s preStop")
        if not any(matches(s["spec"]["selector"], labels) for s in services):
            fail(where, "no Service selects these pods")
        if not any(matches(p["spec"]["selector"]["matchLabels"], labels) for p in pdbs):
            fail(where, "no PodDisruptionBudget covers these pods")
    for hpa in by_kind(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        if target not in {d["metadata"]["name"] for d in deployments} or not target.endswith("-edge"):
            fail(name, f"the HPA scales {target}, not the edge Deployment")
        if "replicas" in roles.get("edge", {}).get("spec", {}):
            fail(name, "an autoscaled Deployment must not set replicas (each upgrade would reset them)")


def check_monitoring(name: str, values: dict, objects: list[dict]) -> None:
    exported = known_metrics()
    monitoring = values.get("monitoring", {})
    wanted = {
        "ServiceMonitor": monitoring.get("serviceMonitor", {}).get("enabled", False),
        "PrometheusRule": monitoring.get("prometheusRule", {}).get("enabled", False),
    }
    for kind, on in wanted.items():
        if bool(by_kind(objects, kind)) != on:
            fail(name, f"{kind} present: {not on}, enabled: {on}")
    for monitor in by_kind(objects, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        if not any(matches(selector, s["metadata"]["labels"]) for s in by_kind(objects, "Service")):
            fail(name, "the ServiceMonitor selects no Service")
        if [e.get("path") for e in monitor["spec"]["endpoints"]] != ["/metrics"]:
            fail(name, "the ServiceMonitor must scrape /metrics")
    for rule in by_kind(objects, "PrometheusRule"):
        alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
        for needed in ("PollcastDeliveryP99Slow", "PollcastOutboxGrowing",
                       "PollcastSlowConsumers", "PollcastReadinessFlapping"):
            if needed not in alerts:
                fail(name, f"alert {needed} missing")
        slow = alerts.get("PollcastDeliveryP99Slow", {})
        if "0.99" not in slow.get("expr", "") or slow.get("for") != "5m":
            fail(name, "the delivery alert must be the p99 over 5 minutes")
        for alert, body in alerts.items():
            unknown = metrics_named(body["expr"]) - exported
            if unknown:
                fail(name, f"alert {alert} uses metrics pollcast does not export: {sorted(unknown)}")
    for config_map in by_kind(objects, "ConfigMap"):
        for key, text in config_map.get("data", {}).items():
            if not key.endswith(".json"):
                continue
            try:
                dashboard = json.loads(text)
            except json.JSONDecodeError as error:
                fail(name, f"dashboard {key} is not JSON: {error}")
                continue
            exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
            unknown = metrics_named(exprs) - exported
            if unknown:
                fail(name, f"dashboard uses metrics pollcast does not export: {sorted(unknown)}")
            for needed in ("pollcast_event_delivery_seconds", "pollcast_ws_connections",
                           "pollcast_ws_rooms", "pollcast_votes_total", "pollcast_replays_total",
                           "pollcast_ws_closes_total"):
                if needed not in exprs:
                    fail(name, f"dashboard has no panel on {needed}")


def check_schema_refuses(chart: helm.Chart) -> None:
    wrong = {
        "a region with a space": {"region": "eu west"},
        "no NATS URL": {"nats": {"urls": []}},
        "an unknown top-level key": {"replicas": 3},
        "an unknown api key": {"api": {"replica": 3}},
        "a MySQL database": {"secrets": {"databaseUrl": "mysql://db/pollcast"}},
        "an origin with a path": {"edge": {"wsOrigins": ["https://app.example/page"]}},
        "stream replicas 0": {"nats": {"streamReplicas": 0}},
    }
    for what, values in wrong.items():
        try:
            chart.render(values, name="pollcast", namespace="pollcast")
        except helm.HelmError:
            continue
        fail("values.schema.json", f"accepts {what}")


def check_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    workspace = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE))
    for member in workspace["members"]:
        top = member.split("/")[0]
        if top not in copied:
            fail("Dockerfile", f"workspace member {member} is not copied into the build")
    wanted = tuple(int(x) for x in workspace["package"]["rust-version"].split("."))
    image = re.search(r"^FROM rust:(\d+)\.(\d+)", text, re.MULTILINE)
    if not image or (int(image[1]), int(image[2])) < wanted[:2]:
        fail("Dockerfile", f"the build image's Rust is older than rust-version {wanted}")
    final = text[text.rindex("\nFROM ") :]
    user = re.search(r"^USER (\d+)", final, re.MULTILINE)
    if not user or user[1] == "0":
        fail("Dockerfile", "the runtime image must run as a non-root user")
    if 'ENTRYPOINT ["/usr/local/bin/pollcast"]' not in final:
        fail("Dockerfile", "the runtime image's entry point must be the pollcast binary")


def main() -> int:
    chart = helm.Chart.load(str(CHART))
    for name, values in values_files().items():
        lint(name, values)
        try:
            objects = render(chart, values)
        except helm.HelmError as error:
            fail(name, f"render: {error}")
            continue
        check_object_schemas(name, objects)
        check_deployments(name, values, objects)
        check_monitoring(name, values, objects)
        print(f"chart: {name}: {len(objects)} objects")
    check_schema_refuses(chart)
    check_dockerfile()
    if failures:
        print("deployment checks failed:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    print("deployment: chart lint, render, schemas, checks and Dockerfile passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
