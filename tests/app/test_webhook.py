"""The sidecar-injecting admission webhook, run as `pointsman webhook` (a real HTTPS server,
certificates made on the spot), fed AdmissionReview v1 objects shaped as in the Kubernetes
documentation. Each JSONPatch it returns is applied with `jsonpatch`, and the patched pod is
validated against the Kubernetes schemas (`kubernetes-validate`, strict, offline)."""

from __future__ import annotations

import base64
import copy
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonpatch
import kubernetes_validate
import pytest

from app.processes import free_port
from app.webhook import SIDECAR_NAME, InjectionSettings, pod_settings, sidecar_patch
from pointsman.errors import ConfigError
from tests.support.certs import make_pki

# Native sidecars (init containers with restartPolicy) are in the schemas from 1.28 on.
KUBERNETES_VERSION = "1.30.0"


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "codegen-client-",
            "namespace": "apps",
            "labels": {"app": "codegen-client"},
            **({"annotations": annotations} if annotations is not None else {}),
        },
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "example.com/codegen-client:1.0",
                    "env": [{"name": "TRITON_URL", "value": "localhost:8001"}],
                }
            ],
            **spec,
        },
    }


def review(obj: Any, uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002") -> dict[str, Any]:
    """An AdmissionReview v1 request as the API server sends it for a pod CREATE."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "",
            "namespace": "apps",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "014fbff9a07c",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


class Webhook:
    def __init__(self, url: str, client: httpx.Client) -> None:
        self.url = url
        self.client = client

    def mutate(self, body: Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(
            f"{self.url}/mutate", content=content, headers={"Content-Type": "application/json"}
        )

    def patched(self, obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the response object, the pod with its patch applied)."""
        answer = self.mutate(review(obj))
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["apiVersion"] == "admission.k8s.io/v1"
        assert body["kind"] == "AdmissionReview"
        response = body["response"]
        assert response["uid"] == review(obj)["request"]["uid"]
        if "patch" not in response:
            return response, obj
        assert response["patchType"] == "JSONPatch"
        patch = json.loads(base64.b64decode(response["patch"]))
        return response, jsonpatch.apply_patch(obj, patch)


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    pki = make_pki(tmp_path_factory.mktemp("webhook-pki"))
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app",
            "webhook",
            "--listen",
            f"127.0.0.1:{port}",
            "--cert",
            str(pki.server.cert),
            "--key",
            str(pki.server.key),
            "--router",
            "pointsman-router.pointsman.svc:8101",
            "--image",
            "registry.example.com/pointsman:test",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"https://127.0.0.1:{port}"
    client = httpx.Client(verify=ssl.create_default_context(cafile=pki.ca), timeout=5)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "webhook did not come up"
            time.sleep(0.1)
        yield Webhook(url, client)
    finally:
        client.close()
        process.terminate()
        process.wait(10)


def validate_pod(obj: dict[str, Any]) -> None:
    named = copy.deepcopy(obj)
    named["metadata"]["name"] = "codegen-client-x1"  # the API server fills generateName in
    kubernetes_validate.validate(named, KUBERNETES_VERSION, strict=True)


def test_annotated_pod_gets_a_native_sidecar(webhook: Webhook) -> None:
    original = pod({"pointsman.io/inject": "true"})
    response, patched = webhook.patched(original)
    assert response["allowed"] is True
    (sidecar,) = patched["spec"]["initContainers"]
    assert sidecar["name"] == SIDECAR_NAME
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    assert sidecar["image"] == "registry.example.com/pointsman:test"
    assert sidecar["args"][:5] == [
        "sidecar",
        "--listen",
        "0.0.0.0:8001",
        "--router",
        "pointsman-router.pointsman.svc:8101",
    ]
    assert sidecar["startupProbe"]["grpc"] == {"port": 8001}
    assert sidecar["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"memory": "512Mi"},
    }
    assert patched["metadata"]["annotations"]["pointsman.io/status"] == "injected"
    assert patched["spec"]["containers"] == original["spec"]["containers"]
    validate_pod(patched)
    # Idempotent: the injected pod, reviewed again (a re-invocation), is left as it is.
    again, unchanged = webhook.patched(patched)
    assert again["allowed"] is True and "patch" not in again
    assert unchanged == patched


def test_annotations_configure_the_sidecar(webhook: Webhook) -> None:
    original = pod(
        {
            "pointsman.io/inject": "true",
            "pointsman.io/router": "router.other.svc:9101",
            "pointsman.io/port": "9001",
            "pointsman.io/metrics-port": "0",
            "pointsman.io/cpu-request": "250m",
            "pointsman.io/memory-limit": "1Gi",
            "pointsman.io/cpu-limit": "1",
        },
        initContainers=[{"name": "fetch-config", "image": "busybox:1.36", "command": ["true"]}],
    )
    _, patched = webhook.patched(original)
    names = [c["name"] for c in patched["spec"]["initContainers"]]
    assert names == [SIDECAR_NAME, "fetch-config"]  # before the other init containers
    sidecar = patched["spec"]["initContainers"][0]
    assert sidecar["args"] == [
        "sidecar",
        "--listen",
        "0.0.0.0:9001",
        "--router",
        "router.other.svc:9101",
    ]
    assert sidecar["resources"] == {
        "requests": {"cpu": "250m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    validate_pod(patched)


def test_plain_container_where_native_sidecars_are_off(webhook: Webhook) -> None:
    original = pod({"pointsman.io/inject": "true", "pointsman.io/native-sidecar": "false"})
    _, patched = webhook.patched(original)
    assert "initContainers" not in patched["spec"]
    assert [c["name"] for c in patched["spec"]["containers"]] == ["app", SIDECAR_NAME]
    assert "restartPolicy" not in patched["spec"]["containers"][1]
    validate_pod(patched)
    assert webhook.patched(patched)[1] == patched  # never twice


@pytest.mark.parametrize(
    "annotations",
    [None, {}, {"pointsman.io/inject": "false"}, {"pointsman.io/inject": "yes"}],
    ids=["no annotations", "empty", "false", "not exactly true"],
)
def test_pods_not_asking_are_allowed_unchanged(
    webhook: Webhook, annotations: dict[str, str] | None
) -> None:
    original = pod(annotations)
    response, patched = webhook.patched(original)
    assert response == {"uid": review(original)["request"]["uid"], "allowed": True}
    assert patched == original


def test_hand_injected_pod_is_not_injected_again(webhook: Webhook) -> None:
    original = pod({"pointsman.io/inject": "true"})
    original["spec"]["containers"].append({"name": SIDECAR_NAME, "image": "x"})
    response, patched = webhook.patched(original)
    assert "patch" not in response and patched == original


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        ("pointsman.io/port", "80a"),
        ("pointsman.io/port", "0"),
        ("pointsman.io/router", "no-port"),
        ("pointsman.io/cpu-request", "lots"),
        ("pointsman.io/native-sidecar", "maybe"),
    ],
)
def test_invalid_annotation_refuses_the_pod_naming_it(
    webhook: Webhook, annotation: str, value: str
) -> None:
    response, _ = webhook.patched(pod({"pointsman.io/inject": "true", annotation: value}))
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert response["status"]["message"].startswith(annotation)


def test_annotations_are_read_by_the_config_reader_as_text() -> None:
    defaults = InjectionSettings(router="router.default:8101", native_sidecar=True)
    settings = pod_settings(
        {
            "pointsman.io/inject": "true",
            "pointsman.io/port": "9001",
            "pointsman.io/native-sidecar": "false",
            "pointsman.io/cpu-limit": "1",  # a quantity stays text
            "image": "not-a-pointsman-annotation",
            "example.com/port": "1",
        },
        defaults,
    )
    assert (settings.port, settings.native_sidecar, settings.cpu_limit) == (9001, False, "1")
    assert (settings.router, settings.image) == ("router.default:8101", defaults.image)
    for given, message in (
        ({"pointsman.io/port": "1.5"}, "pointsman.io/port: must be an integer in [1, 65535]"),
        ({"pointsman.io/metrics-port": "-1"}, "pointsman.io/metrics-port: must be an integer"),
        ({"pointsman.io/native-sidecar": "yes"}, "pointsman.io/native-sidecar: must be true or"),
    ):
        with pytest.raises(ConfigError) as info:
            pod_settings(given, defaults)
        assert str(info.value).startswith(message), str(info.value)
    # The flags' defaults meet the same rules: a bad --router stops the webhook's start.
    with pytest.raises(ConfigError, match=r"^pointsman\.io/router: must be host:port"):
        InjectionSettings(router="no-port")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "Expecting property name"),
        (b"\xff\xfe", "Expecting value"),
        ([1, 2], "body: must be a JSON object"),
        ({**review(pod()), "apiVersion": "admission.k8s.io/v1beta1"}, "apiVersion/kind"),
        ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "request: must be"),
        ({**review(pod()), "request": {**review(pod())["request"], "uid": ""}}, "request.uid"),
        (
            {**review(pod()), "request": {**review(pod())["request"], "object": None}},
            "request.object",
        ),
        (
            {
                **review(pod()),
                "request": {**review(pod())["request"], "object": {"kind": "Secret"}},
            },
            "request.object: must be a Pod",
        ),
        (
            {**review(pod()), "request": {**review(pod())["request"], "object": {"kind": "Pod"}}},
            "request.object.spec",
        ),
    ],
)
def test_malformed_reviews_get_400_with_a_reason(webhook: Webhook, body: Any, message: str) -> None:
    answer = webhook.mutate(body)
    assert answer.status_code == 400
    assert message in answer.json()["error"]


def test_other_paths_and_plaintext_are_refused(webhook: Webhook) -> None:
    assert webhook.client.post(f"{webhook.url}/validate", content=b"{}").status_code == 404
    plain = webhook.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{plain}/mutate", content=b"{}", timeout=2)
    # The server survives all of the above.
    assert webhook.client.get(f"{webhook.url}/healthz").status_code == 200


def test_patch_paths_escape_the_annotation_key() -> None:
    patch = sidecar_patch(pod({"pointsman.io/inject": "true"}), InjectionSettings())
    assert patch[-1] == {
        "op": "add",
        "path": "/metadata/annotations/pointsman.io~1status",
        "value": "injected",
    }
