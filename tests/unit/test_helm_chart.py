"""The Helm chart (deploy/helm/agentflow), linted and rendered offline and validated.

- Lint and render with ``helm-python-sdk``: Helm 4's Go SDK compiled into a C library
  that the wheel carries (no helm binary, no download, no cluster). Rendering also checks
  values.schema.json, as ``helm template`` does.
- Every value set in ``ci/*-values.yaml`` (chart-testing's convention) is one case.
- Every rendered manifest of a built-in kind is validated with ``kubernetes-validate``
  in strict mode (unknown fields are errors) against the OpenAPI schemas of Kubernetes
  1.30 (the chart's kubeVersion floor) and of the newest version the package ships.
- The CRDs (KEDA ``ScaledObject``, Prometheus Operator ``ServiceMonitor``) have no schema
  there: they are checked structurally here (apiVersion, kind, required fields, and that
  what they point at is rendered).
- Cross references: selectors, scale targets, Secret/ConfigMap/ServiceAccount names.

``python tests/unit/test_helm_chart.py`` prints the values table of the chart's README.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/agentflow"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
RELEASE, NAMESPACE = "rel", "apps"
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")

Doc = dict[str, Any]


def ci_values(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())
    return values


def render(values: dict[str, Any]) -> list[Doc]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for template, text in sorted(manifests.items()):
        if not template.endswith(".yaml"):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__template"] = template
                docs.append(doc)
    return docs


@cache
def rendered(path: Path) -> tuple[Doc, ...]:
    return tuple(render(yaml.safe_load(path.read_text())))


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as info:
        render(values)
    return str(info.value)


def clean(doc: Doc) -> Doc:
    return {k: v for k, v in doc.items() if k != "__template"}


def of_kind(docs: tuple[Doc, ...] | list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: tuple[Doc, ...] | list[Doc]) -> Iterator[tuple[str, Doc]]:
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def container(docs: tuple[Doc, ...], deployment: str) -> Doc:
    (c,) = of_kind(docs, "Deployment")[f"{RELEASE}-agentflow-{deployment}"]["spec"]["template"]["spec"]["containers"]
    found: Doc = c
    return found


def env_of(c: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


ids = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]


# --- lint, schema, Kubernetes validation ---------------------------------------------------


@pytest.mark.parametrize("values_file", CI_VALUES, ids=ids)
def test_lint_is_clean(values_file: Path) -> None:
    values = yaml.safe_load(values_file.read_text())
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems
    assert report["total_charts_linted"] == 1


@pytest.mark.parametrize("values_file", CI_VALUES, ids=ids)
def test_manifests_validate_against_kubernetes_schemas(values_file: Path) -> None:
    docs = rendered(values_file)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            check_crd(doc, docs)
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(clean(doc), version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['__template']}: {doc['kind']} {doc['metadata']['name']} (k8s {version}): {exc}")


def test_strict_validation_is_live() -> None:
    """The validator rejects what the API server would: an unknown field, a wrong type."""
    docs = rendered(CHART / "ci/lint-values.yaml")
    deployment = json.loads(json.dumps(clean(next(d for d in docs if d["kind"] == "Deployment"))))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)
    service = json.loads(json.dumps(clean(of_kind(docs, "Service")[f"{RELEASE}-agentflow-control-plane"])))
    service["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, "1.30.0", strict=True)


def check_crd(doc: Doc, docs: tuple[Doc, ...]) -> None:
    """Structural checks of the two custom resources (their CRDs ship with KEDA and the
    Prometheus Operator, not with kubernetes-validate)."""
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    spec = doc["spec"]
    if doc["kind"] == "ScaledObject":
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                             "cooldownPeriod", "idleReplicaCount", "advanced", "fallback", "triggers"}  # fmt: skip
        target = spec["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in of_kind(docs, "Deployment")
        for key in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
            assert isinstance(spec[key], int) and spec[key] >= 0
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["triggers"]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "nats-jetstream"
            metadata = trigger["metadata"]
            # KEDA's trigger metadata is map[string]string: a number here fails admission.
            assert all(isinstance(v, str) for v in metadata.values()), metadata
            assert {"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"} <= set(metadata)
            assert int(metadata["lagThreshold"]) > 0 and metadata["useHttps"] in ("true", "false")
    elif doc["kind"] == "ServiceMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        services = [
            s
            for s in of_kind(docs, "Service").values()
            if selects(spec["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert services, f"ServiceMonitor {name} selects no rendered Service"
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "tlsConfig", "relabelings"}
            for service in services:
                ports = [p["name"] for p in service["spec"]["ports"]]
                assert endpoint["port"] in ports, (
                    f"ServiceMonitor {name} scrapes port {endpoint['port']}, not in {ports}"
                )
            for key in ("interval", "scrapeTimeout"):
                assert re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint[key])
        if "namespaceSelector" in spec:
            assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
    else:
        pytest.fail(f"unexpected custom resource {doc['kind']}")


# --- invariants of every value set ---------------------------------------------------------


@pytest.mark.parametrize("values_file", CI_VALUES, ids=ids)
def test_references_resolve(values_file: Path) -> None:
    docs = rendered(values_file)
    values = yaml.safe_load(values_file.read_text())
    workloads = {**of_kind(docs, "Deployment"), **of_kind(docs, "Job")}
    pod_labels = {n: w["spec"]["template"]["metadata"]["labels"] for n, w in workloads.items()}
    for name, deployment in of_kind(docs, "Deployment").items():
        assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels[name])
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        for name, doc in of_kind(docs, kind).items():
            selector = (
                doc["spec"]["selector"]
                if kind == "Service"
                else doc["spec"].get("selector", doc["spec"].get("podSelector"))
            )
            selector = selector.get("matchLabels", selector)
            matched = [w for w, labels in pod_labels.items() if selects(selector, labels)]
            assert matched, f"{kind} {name} selects no pod"
    for hpa in of_kind(docs, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in of_kind(docs, "Deployment")
        # An autoscaled Deployment leaves `replicas` to the autoscaler (or upgrades fight it).
        target = hpa["spec"]["scaleTargetRef"]["name"]
        assert "replicas" not in of_kind(docs, "Deployment")[target]["spec"], f"{target} sets replicas under an HPA"
    secrets = set(of_kind(docs, "Secret"))
    configmaps = set(of_kind(docs, "ConfigMap"))
    external = {
        values.get(section, {}).get("existingSecret") for section in ("jwt", "externalDatabase", "externalNats")
    } | {values.get("worker", {}).get("secrets", {}).get("envFromSecret")}
    external |= {f["secretName"] for f in values.get("worker", {}).get("secrets", {}).get("files", [])}
    for name, pod in pod_specs(docs):
        for c in pod["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets | external, f"{name}: {e['name']} refers to Secret {ref['name']}"
                    if ref["name"] in secrets:
                        assert ref["key"] in of_kind(docs, "Secret")[ref["name"]]["data"], f"{name}: {e['name']}"
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets | external
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])}, name
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets | external
        if name in of_kind(docs, "Deployment"):
            account = pod["serviceAccountName"]
            assert account in of_kind(docs, "ServiceAccount") or not values.get("serviceAccount", {}).get(
                "create", True
            )


@pytest.mark.parametrize("values_file", CI_VALUES, ids=ids)
def test_pods_are_locked_down(values_file: Path) -> None:
    docs = rendered(values_file)
    sandbox = yaml.safe_load(values_file.read_text()).get("worker", {}).get("sandbox", {}).get("enabled", False)
    for name, pod in pod_specs(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], name
            if sandbox and name.endswith("-worker"):
                continue  # test_sandbox_values
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert "add" not in sc["capabilities"], name
            # no default secret: every secret-looking variable comes from a Secret
            for e in c.get("env", []):
                if (
                    re.search(r"SECRET|PASSWORD|DATABASE_URL|NATS_URL", e["name"])
                    and e["name"] != "AGENTFLOW_SECRETS_DIR"
                ):
                    assert "valueFrom" in e, f"{name}: {e['name']} is inline"


@pytest.mark.parametrize("values_file", CI_VALUES, ids=ids)
def test_probes(values_file: Path) -> None:
    docs = rendered(values_file)
    cp = container(docs, "control-plane")
    assert cp["startupProbe"]["httpGet"]["path"] == cp["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert cp["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {p["name"] for p in cp["ports"]} == {"http"}
    worker = container(docs, "worker")
    metrics = yaml.safe_load(values_file.read_text()).get("worker", {}).get("metrics", {}).get("enabled", True)
    probes = {"startupProbe", "livenessProbe", "readinessProbe"}
    if metrics:
        assert probes <= set(worker)
        assert all(worker[p]["httpGet"]["port"] == "metrics" for p in probes)
        assert env_of(worker)["AGENTFLOW_WORKER_METRICS_HOST"] == "0.0.0.0"
    else:
        # Without the metrics endpoint the worker serves nothing a probe could ask.
        assert not probes & set(worker) and "ports" not in worker


def test_migrations_run_as_a_hook_before_anything_else() -> None:
    docs = rendered(CHART / "ci/lint-values.yaml")
    job = of_kind(docs, "Job")[f"{RELEASE}-agentflow-migrate"]
    hook_secret = of_kind(docs, "Secret")[f"{RELEASE}-agentflow-migrate"]
    for doc, weight in ((hook_secret, -10), (job, 0)):
        annotations = doc["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert int(annotations["helm.sh/hook-weight"]) == weight
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["migrate"] and c["image"] == container(docs, "control-plane")["image"]
    # The Job reads the hook's own copy of the URL (the release's Secret is not there yet),
    # and nothing but the database URL.
    assert env_of(c)["AGENTFLOW_DATABASE_URL"]["secretKeyRef"]["name"] == hook_secret["metadata"]["name"]
    assert set(env_of(c)) == {"AGENTFLOW_DATABASE_URL"}
    assert "serviceAccountName" not in job["spec"]["template"]["spec"]


# --- the value sets ------------------------------------------------------------------------


def test_defaults() -> None:
    docs = rendered(CHART / "ci/lint-values.yaml")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "Secret", "Secret", "ServiceAccount", "Deployment", "Deployment", "Job",
                            "Service", "Service", "HorizontalPodAutoscaler", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget", "PodDisruptionBudget"])  # fmt: skip
    secret = of_kind(docs, "Secret")[f"{RELEASE}-agentflow"]
    assert set(secret["data"]) == {"jwt-secret", "database-url", "nats-url"}
    cp, worker = container(docs, "control-plane"), container(docs, "worker")
    assert cp["image"] == "agentflow-control-plane:0.1.0" and worker["image"] == "agentflow-worker:0.1.0"
    assert cp["args"] == ["control-plane"] and worker["args"] == ["worker"]
    # Workers get the bus only.
    assert not {"AGENTFLOW_DATABASE_URL", "AGENTFLOW_JWT_SECRET"} & set(env_of(worker))
    assert env_of(cp)["AGENTFLOW_DEV_MODE"] == "false"
    config = of_kind(docs, "ConfigMap")[f"{RELEASE}-agentflow"]["data"]
    assert config == {
        "AGENTFLOW_NATS_PREFIX": "agentflow",
        "AGENTFLOW_LOG_LEVEL": "info",
        "AGENTFLOW_STEP_ACK_WAIT_S": "30",
    }
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    for hpa in hpas.values():
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["averageUtilization"] == 70
    for pdb in of_kind(docs, "PodDisruptionBudget").values():
        assert pdb["spec"]["maxUnavailable"] == 1
    workers_svc = of_kind(docs, "Service")[f"{RELEASE}-agentflow-worker-metrics"]
    assert workers_svc["spec"]["clusterIP"] == "None"


def test_ingress_with_tls() -> None:
    docs = rendered(CHART / "ci/ingress-tls-values.yaml")
    (ingress,) = of_kind(docs, "Ingress").values()
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "agentflow-tls", "hosts": ["agentflow.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = of_kind(docs, "Service")[backend["name"]]
    assert backend["port"]["number"] == service["spec"]["ports"][0]["port"]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"


def test_keda_scales_workers_on_consumer_lag() -> None:
    docs = rendered(CHART / "ci/keda-values.yaml")
    (scaled,) = of_kind(docs, "ScaledObject").values()
    (trigger,) = scaled["spec"]["triggers"]
    # The names agentflow_bus gives the steps stream and the queue's durable consumer.
    from agentflow_bus.subjects import Names

    names = Names("prod-eu")
    assert trigger["metadata"]["stream"] == names.steps_stream == "PROD_EU_STEPS"
    assert trigger["metadata"]["consumer"] == names.step_consumer("gpu")
    assert trigger["metadata"]["natsServerMonitoringEndpoint"] == "nats.nats.svc.cluster.local:8222"
    assert trigger["metadata"]["lagThreshold"] == "32" and trigger["metadata"]["activationLagThreshold"] == "1"
    assert scaled["spec"]["minReplicaCount"] == 0 and scaled["spec"]["maxReplicaCount"] == 30
    assert scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    # KEDA owns the workers' HPA; the chart's is for the control plane only.
    assert list(of_kind(docs, "HorizontalPodAutoscaler")) == [f"{RELEASE}-agentflow-control-plane"]
    assert "replicas" not in of_kind(docs, "Deployment")[f"{RELEASE}-agentflow-worker"]["spec"]
    assert env_of(container(docs, "worker"))["AGENTFLOW_WORKER_QUEUE"] == "gpu"


def test_fixed_replicas_without_autoscaling() -> None:
    docs = rendered(CHART / "ci/hpa-off-values.yaml")
    assert not of_kind(docs, "HorizontalPodAutoscaler")
    deployments = of_kind(docs, "Deployment")
    assert deployments[f"{RELEASE}-agentflow-control-plane"]["spec"]["replicas"] == 3
    assert deployments[f"{RELEASE}-agentflow-worker"]["spec"]["replicas"] == 4
    assert {n: p["spec"] for n, p in of_kind(docs, "PodDisruptionBudget").items()} == {
        f"{RELEASE}-agentflow-control-plane": {
            "minAvailable": 2,
            "selector": deployments[f"{RELEASE}-agentflow-control-plane"]["spec"]["selector"],
        }
    }
    assert f"{RELEASE}-agentflow-worker-metrics" not in of_kind(docs, "Service")
    assert "AGENTFLOW_WORKER_METRICS_PORT" not in env_of(container(docs, "worker"))


def test_service_monitors() -> None:
    docs = rendered(CHART / "ci/servicemonitor-values.yaml")
    monitors = of_kind(docs, "ServiceMonitor")
    assert set(monitors) == {f"{RELEASE}-agentflow-control-plane", f"{RELEASE}-agentflow-worker"}
    for monitor in monitors.values():
        assert monitor["metadata"]["namespace"] == "monitoring"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["spec"]["endpoints"][0]["interval"] == "15s"
    assert monitors[f"{RELEASE}-agentflow-control-plane"]["spec"]["endpoints"][0]["port"] == "http"
    assert monitors[f"{RELEASE}-agentflow-worker"]["spec"]["endpoints"][0]["port"] == "metrics"


def egress_ports(policy: Doc) -> set[int]:
    return {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}


def test_network_policies() -> None:
    docs = rendered(CHART / "ci/networkpolicy-values.yaml")
    policies = of_kind(docs, "NetworkPolicy")
    cp = policies[f"{RELEASE}-agentflow-control-plane"]
    worker = policies[f"{RELEASE}-agentflow-worker"]
    migrate = policies[f"{RELEASE}-agentflow-migrate"]
    for policy in (cp, worker, migrate):
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # Ingress: the control plane's http port from the ingress controller, the workers'
    # metrics port from monitoring, nothing to the migration Job.
    (cp_in,) = cp["spec"]["ingress"]
    assert cp_in["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert cp_in["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "ingress-nginx"
    (worker_in,) = worker["spec"]["ingress"]
    assert worker_in["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert migrate["spec"]["ingress"] == []
    # Egress: DNS, and per component only what it talks to (4318: the OTLP collector).
    assert egress_ports(cp) == {53, 5432, 4222, 4318}
    assert egress_ports(worker) == {53, 4222, 4318, 443}
    assert egress_ports(migrate) == {53, 5432}
    postgres_rule = next(r for r in cp["spec"]["egress"] if r["ports"][0]["port"] == 5432)
    assert postgres_rule["to"] == [{"ipBlock": {"cidr": "10.0.5.0/24"}}]
    dns_rule = cp["spec"]["egress"][0]
    assert {p["protocol"] for p in dns_rule["ports"]} == {"UDP", "TCP"} and dns_rule["to"]
    assert of_kind(docs, "ConfigMap")[f"{RELEASE}-agentflow"]["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4318")


def test_existing_secrets_provider_keys_and_tools(tmp_path: Path) -> None:
    docs = rendered(CHART / "ci/existing-secrets-values.yaml")
    # Nothing secret is stored by the chart: no Secret at all, not even the hook's copy.
    assert not of_kind(docs, "Secret")
    cp, worker = container(docs, "control-plane"), container(docs, "worker")
    for c in (cp, worker):
        assert env_of(c)["AGENTFLOW_NATS_URL"]["secretKeyRef"] == {"name": "agentflow-secrets", "key": "nats-url"}
    assert env_of(cp)["AGENTFLOW_JWT_SECRET"]["secretKeyRef"] == {"name": "agentflow-secrets", "key": "jwt-secret"}
    assert env_of(cp)["AGENTFLOW_JWT_PUBLIC_KEY"].startswith("-----BEGIN PUBLIC KEY-----")
    job = of_kind(docs, "Job")[f"{RELEASE}-agentflow-migrate"]
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert env_of(migrate)["AGENTFLOW_DATABASE_URL"]["secretKeyRef"] == {
        "name": "agentflow-secrets",
        "key": "database-url",
    }
    # Provider keys: shared ones as AGENTFLOW_SECRET_<KEY>, per-tenant ones as files.
    assert {"prefix": "AGENTFLOW_SECRET_", "secretRef": {"name": "agentflow-provider-keys"}} in worker["envFrom"]
    assert env_of(worker)["AGENTFLOW_SECRETS_DIR"] == "/var/run/agentflow/secrets"
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    pod = of_kind(docs, "Deployment")[f"{RELEASE}-agentflow-worker"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/var/run/agentflow/secrets/acme"]]["secret"]["secretName"] == "acme-llm-keys"
    assert volumes[mounts["/var/run/agentflow/secrets/_shared"]]["secret"]["secretName"] == "agentflow-shared-keys"
    assert (
        volumes[mounts["/var/lib/agentflow/workspace"]]["persistentVolumeClaim"]["claimName"] == "agentflow-workspace"
    )
    # The tools file is mounted where AGENTFLOW_TOOLS_FILE says, in a form the loader accepts.
    config = of_kind(docs, "ConfigMap")
    assert config[f"{RELEASE}-agentflow"]["data"]["AGENTFLOW_TOOLS_FILE"] == "/etc/agentflow/tools.yaml"
    assert config[f"{RELEASE}-agentflow"]["data"]["AGENTFLOW_DB_POOL_SIZE"] == "20"
    for c in (cp, worker):
        assert {"name": "tools", "mountPath": "/etc/agentflow", "readOnly": True} in c["volumeMounts"]
    from agentflow_core.tools_config import load_tools_config

    tools_file = tmp_path / "tools.yaml"
    tools_file.write_text(config[f"{RELEASE}-agentflow-tools"]["data"]["tools.yaml"])
    assert [t.id for t in load_tools_config(str(tools_file)).tools] == ["slugify"]
    assert {"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_traceidratio"} in worker["env"]


def test_sandbox_values() -> None:
    docs = rendered(CHART / "ci/sandbox-values.yaml")
    sc = container(docs, "worker")["securityContext"]
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"SYS_ADMIN", "SYS_CHROOT", "SETUID", "SETGID", "SETPCAP"} <= set(sc["capabilities"]["add"])
    # The API server refuses allowPrivilegeEscalation=false next to CAP_SYS_ADMIN.
    assert sc["allowPrivilegeEscalation"] is True
    assert sc["appArmorProfile"] == {"type": "Unconfined"}
    assert sc["readOnlyRootFilesystem"] is True
    # Only the worker: the control plane keeps the restricted context.
    assert container(docs, "control-plane")["securityContext"]["runAsNonRoot"] is True


# --- refusals ------------------------------------------------------------------------------

PLACEHOLDERS = ci_values("lint")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "jwt.secret or jwt.existingSecret is required"),
        ({**PLACEHOLDERS, "jwt": {"secret": "too-short"}}, "jwt.secret must be at least 32 characters"),
        ({"jwt": PLACEHOLDERS["jwt"], "externalNats": PLACEHOLDERS["externalNats"]}, "externalDatabase.url or"),
        ({"jwt": PLACEHOLDERS["jwt"], "externalDatabase": PLACEHOLDERS["externalDatabase"]}, "externalNats.url or"),
        ({**PLACEHOLDERS, "worker": {"keda": {"enabled": True, "natsMonitoringEndpoint": "nats:8222"}}},
         "exclude each other"),
        ({**PLACEHOLDERS, "worker": {"autoscaling": {"enabled": False}, "keda": {"enabled": True}}},
         "worker.keda.natsMonitoringEndpoint is required"),
        ({**PLACEHOLDERS, "metrics": {"serviceMonitor": {"enabled": True}}, "worker": {"metrics": {"enabled": False}}},
         "needs worker.metrics.enabled"),
        ({**PLACEHOLDERS, "workers": {}}, "additional properties 'workers' not allowed"),
        ({**PLACEHOLDERS, "worker": {"queue": "no spaces"}}, "/worker/queue"),
        ({**PLACEHOLDERS, "config": {"logLevel": "TRACE"}}, "/config/logLevel"),
        ({**PLACEHOLDERS, "externalDatabase": {"url": "mysql://x"}}, "/externalDatabase/url"),
    ],
    ids=["nothing", "short-jwt", "no-database", "no-nats", "keda-and-hpa", "keda-no-endpoint",
         "servicemonitor-no-metrics", "typo", "bad-queue", "bad-log-level", "bad-db-url"],
)  # fmt: skip
def test_bad_values_are_refused_with_the_key_named(values: dict[str, Any], message: str) -> None:
    assert message in render_error(values)


def test_default_values_hold_no_secret_and_match_the_schema() -> None:
    import jsonschema

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["jwt"]["secret"] == values["externalDatabase"]["url"] == values["externalNats"]["url"] == ""
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(values, schema)
    for path in CI_VALUES:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


# --- values documentation (helm-docs style) ------------------------------------------------


def documented_values() -> list[tuple[str, Any, str]]:
    """(key path, default, description) of every key documented with a `# --` comment.
    A documented key documents its whole subtree, as helm-docs treats it."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    out: list[tuple[str, Any, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] | None = None
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped.removeprefix("# --").strip()]
            continue
        if stripped.startswith("#"):
            if comment is not None:
                comment.append(stripped.removeprefix("#").strip())
            continue
        match = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if not match:
            if not stripped:
                comment = None
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        if comment is not None:
            path = ".".join(k for _, k in stack)
            value: Any = defaults
            for key in path.split("."):
                value = value[key]
            out.append((path, value, " ".join(comment)))
            comment = None
    return out


def test_every_value_is_documented() -> None:
    documented = {path for path, _, _ in documented_values()}
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaves(node: Any, prefix: str) -> Iterator[str]:
        if isinstance(node, dict) and node and prefix not in documented:
            for key, value in node.items():
                yield from leaves(value, f"{prefix}.{key}" if prefix else key)
        else:
            yield prefix

    undocumented = [p for p in leaves(defaults, "") if not any(p == d or p.startswith(d + ".") for d in documented)]
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def values_table() -> str:
    def kind(value: Any) -> str:
        return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}[type(value)]

    rows = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for path, value, description in documented_values():
        default = json.dumps(value, separators=(",", ":")).replace("|", "\\|")
        text = description.replace("|", "\\|")
        rows.append(f"| {path} | {kind(value)} | `{default}` | {text} |")
    return "\n".join(rows)


def test_readme_values_table_is_current() -> None:
    readme = (CHART / "README.md").read_text()
    match = re.search(r"<!-- values-table:start -->\n(.*?)\n<!-- values-table:end -->", readme, re.S)
    assert match, "README.md has no values-table markers"
    assert match.group(1) == values_table(), (
        "the README's values table is stale: replace it with the output of `python tests/unit/test_helm_chart.py`"
    )


if __name__ == "__main__":
    sys.stdout.write(values_table() + "\n")
