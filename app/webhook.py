"""`pointsman webhook`: a mutating admission webhook that injects the Pointsman sidecar.

Kubernetes sends an AdmissionReview (admission.k8s.io/v1) for every pod created in the
namespaces the MutatingWebhookConfiguration selects (deploy/webhook/). A pod annotated
`pointsman.io/inject: "true"` gets the sidecar; every other pod is allowed unchanged.

    annotation                      default              what
    pointsman.io/inject             -                    "true" asks for the sidecar
    pointsman.io/router             --router             the router's host:port
    pointsman.io/port               8001                 where the app finds Triton's API
    pointsman.io/metrics-port       9464                 the sidecar's /metrics; "0" = off
    pointsman.io/cpu-request        100m                 the sidecar's resources
    pointsman.io/memory-request     128Mi
    pointsman.io/cpu-limit          ""                   "" = no limit
    pointsman.io/memory-limit       512Mi
    pointsman.io/native-sidecar     --native-sidecar     "false": a plain container instead
    pointsman.io/status             (set by us)          "injected": never inject twice

A native sidecar (Kubernetes >= 1.29, on by default there) is an init container with
`restartPolicy: Always`: it starts, and passes its startup probe, before the app's containers,
and stops after them. Older clusters get a regular container (`--no-native-sidecar`).

Answers: a well-formed review gets HTTP 200 with `allowed: true` and, when injecting, a base64
JSONPatch; a pod whose Pointsman annotations are invalid is refused (`allowed: false`, code
400, the message names the annotation); input that is not an AdmissionReview v1 gets HTTP 400
with a JSON error body (`InvalidRequestError`), which the API server reports and, with the
documented `failurePolicy: Ignore`, lets the pod through unchanged.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pointsman.config import Rule, host_port, keys_of, read, rule, validate
from pointsman.errors import ConfigError, InvalidRequestError

__all__ = [
    "ANNOTATION_PREFIX",
    "SIDECAR_NAME",
    "InjectionSettings",
    "WebhookServer",
    "add_arguments",
    "pod_settings",
    "review_response",
    "run",
    "sidecar_container",
    "sidecar_patch",
]

log = logging.getLogger(__name__)

ANNOTATION_PREFIX = "pointsman.io/"
INJECT = ANNOTATION_PREFIX + "inject"
STATUS = ANNOTATION_PREFIX + "status"
SIDECAR_NAME = "pointsman-sidecar"
# An AdmissionReview of a pod is a few kB; refuse anything absurd before parsing it.
_MAX_BODY_BYTES = 4 * 1024 * 1024
# A client that opens a connection and says nothing holds one thread only this long.
_HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_IMAGE = "ghcr.io/pointsman/pointsman:0.1.0"
DEFAULT_ROUTER = "pointsman-router.pointsman.svc:8101"


def _quantity(value: str) -> None:
    """A Kubernetes quantity: digits, an optional fraction, an optional suffix (m, Mi, G...)."""
    number = value.rstrip("EPTGMKkmunai")
    if value and not (number and number.replace(".", "", 1).isdigit()):
        raise ValueError("must be a quantity such as 100m or 128Mi")


def _annotation(name: str, **checks: Any) -> dict[str, Rule]:
    return rule(key=ANNOTATION_PREFIX + name, **checks)


@dataclass(frozen=True, slots=True)
class InjectionSettings:
    """The webhook's defaults (from its flags); the pod's annotations, read by the one config
    reader (pointsman/config/) with each field's annotation as its key, override all but
    the image."""

    image: str = DEFAULT_IMAGE
    router: str = field(default=DEFAULT_ROUTER, metadata=_annotation("router", check=host_port))
    port: int = field(default=8001, metadata=_annotation("port", minimum=1, maximum=65535))
    # 0: no /metrics.
    metrics_port: int = field(
        default=9464, metadata=_annotation("metrics-port", minimum=0, maximum=65535)
    )
    cpu_request: str = field(default="100m", metadata=_annotation("cpu-request", check=_quantity))
    memory_request: str = field(
        default="128Mi", metadata=_annotation("memory-request", check=_quantity)
    )
    # "": no limit.
    cpu_limit: str = field(default="", metadata=_annotation("cpu-limit", check=_quantity))
    memory_limit: str = field(
        default="512Mi", metadata=_annotation("memory-limit", check=_quantity)
    )
    native_sidecar: bool = field(default=True, metadata=_annotation("native-sidecar"))

    def __post_init__(self) -> None:
        validate(self)  # the flags' values too, which no annotation may have replaced


def pod_settings(annotations: Mapping[str, str], defaults: InjectionSettings) -> InjectionSettings:
    """`defaults` with the pod's Pointsman annotations over them; ConfigError naming the
    annotation when one does not validate (the pod is then refused)."""
    settable = {key for key in keys_of(InjectionSettings) if key.startswith(ANNOTATION_PREFIX)}
    given = {key: value for key, value in annotations.items() if key in settable}
    return read(InjectionSettings, given, root="annotations", base=defaults, text=True)


def sidecar_container(
    annotations: Mapping[str, str], settings: InjectionSettings
) -> tuple[dict[str, Any], bool]:
    """The sidecar container the annotations ask for, and whether it is a native sidecar."""
    pod = pod_settings(annotations, settings)
    resources: dict[str, dict[str, str]] = {}
    for section, key, value in (
        ("requests", "cpu", pod.cpu_request),
        ("requests", "memory", pod.memory_request),
        ("limits", "cpu", pod.cpu_limit),
        ("limits", "memory", pod.memory_limit),
    ):
        if value:
            resources.setdefault(section, {})[key] = value
    # 0.0.0.0: the kubelet's gRPC probe dials the pod IP; the app still uses localhost.
    args = ["sidecar", "--listen", f"0.0.0.0:{pod.port}", "--router", pod.router]
    ports = [{"name": "pointsman-grpc", "containerPort": pod.port, "protocol": "TCP"}]
    if pod.metrics_port:
        args += ["--metrics-listen", f"0.0.0.0:{pod.metrics_port}"]
        ports.append({"name": "pointsman-metrics", "containerPort": pod.metrics_port})
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": pod.image,
        "args": args,
        "ports": ports,
        "resources": resources,
        # grpc.health.v1 on the sidecar's own port: SERVING once it has route tables.
        "startupProbe": {"grpc": {"port": pod.port}, "periodSeconds": 1, "failureThreshold": 60},
        "readinessProbe": {"grpc": {"port": pod.port}, "periodSeconds": 5},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if pod.native_sidecar:
        container["restartPolicy"] = "Always"
    return container, pod.native_sidecar


def _is_injected(pod: Mapping[str, Any]) -> bool:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    spec = pod.get("spec") or {}
    names = {
        c.get("name")
        for key in ("containers", "initContainers")
        for c in spec.get(key) or ()
        if isinstance(c, Mapping)
    }
    return annotations.get(STATUS) == "injected" or SIDECAR_NAME in names


def sidecar_patch(pod: Mapping[str, Any], settings: InjectionSettings) -> list[dict[str, Any]]:
    """The RFC 6902 JSONPatch that injects the sidecar into `pod`; [] when it is not asked for
    or already there. Raises ConfigError for invalid Pointsman annotations."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if annotations.get(INJECT) != "true" or _is_injected(pod):
        return []
    container, native = sidecar_container(annotations, settings)
    spec = pod.get("spec") or {}
    key = "initContainers" if native else "containers"
    patch: list[dict[str, Any]] = []
    if spec.get(key):
        # Native sidecars go first: init containers after them start once the sidecar is up.
        at = "0" if native else "-"
        patch.append({"op": "add", "path": f"/spec/{key}/{at}", "value": container})
    else:
        patch.append({"op": "add", "path": f"/spec/{key}", "value": [container]})
    # "/" in a JSON Pointer token is written "~1" (RFC 6901).
    status_path = "/metadata/annotations/" + STATUS.replace("~", "~0").replace("/", "~1")
    patch.append({"op": "add", "path": status_path, "value": "injected"})
    return patch


def review_response(review: Any, settings: InjectionSettings) -> dict[str, Any]:
    """The AdmissionReview answering `review`; InvalidRequestError when it is not one."""
    if not isinstance(review, Mapping):
        raise InvalidRequestError("body: must be a JSON object (an AdmissionReview)")
    if review.get("apiVersion") != "admission.k8s.io/v1" or review.get("kind") != "AdmissionReview":
        raise InvalidRequestError(
            "apiVersion/kind: must be admission.k8s.io/v1 AdmissionReview, got "
            f"{review.get('apiVersion')!r}/{review.get('kind')!r}"
        )
    request = review.get("request")
    if not isinstance(request, Mapping):
        raise InvalidRequestError("request: must be an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise InvalidRequestError("request.uid: must be a non-empty string")
    pod = request.get("object")
    if not isinstance(pod, Mapping) or pod.get("kind", "Pod") != "Pod":
        raise InvalidRequestError("request.object: must be a Pod")
    if not isinstance(pod.get("spec"), Mapping):
        raise InvalidRequestError("request.object.spec: must be an object")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    try:
        patch = sidecar_patch(pod, settings)
    except ConfigError as exc:
        response = {"uid": uid, "allowed": False, "status": {"code": 400, "message": str(exc)}}
        patch = []
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


# --- the HTTPS server ----------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        if self.path in ("/healthz", "/readyz"):
            self._reply(HTTPStatus.OK, {"status": "ok"})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path: {self.path}"})

    def do_POST(self) -> None:
        try:
            body = self._body()
        except InvalidRequestError as exc:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        if self.path.split("?", 1)[0] != "/mutate":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path: {self.path}"})
            return
        try:
            review = json.loads(body)
            answer = review_response(review, self.server.settings)
        except (InvalidRequestError, ValueError) as exc:
            # json.JSONDecodeError and bad UTF-8 are ValueErrors too.
            log.warning("refused a malformed admission review: %s", exc)
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        response = answer["response"]
        changed = "injected" if "patch" in response else "unchanged"
        log.info("admission %s: %s", response["uid"], changed if response["allowed"] else "refused")
        self._reply(HTTPStatus.OK, answer)

    def _body(self) -> bytes:
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            raise InvalidRequestError("Content-Length: required")
        length = int(length_text)
        if length > _MAX_BODY_BYTES:
            raise InvalidRequestError(f"body: larger than {_MAX_BODY_BYTES} bytes")
        return self.rfile.read(length)

    def _reply(self, status: HTTPStatus, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status is HTTPStatus.BAD_REQUEST:
            # The request body may be unread: the connection cannot carry another request.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)


class WebhookServer(ThreadingHTTPServer):
    """The HTTPS server; `port` is the bound port (tests bind port 0). The TLS handshake runs
    in each connection's thread, so a slow client never holds up `accept`; the certificate is
    read again when its file changes (cert-manager renews it in place)."""

    daemon_threads = True

    def __init__(
        self, listen: str, cert_file: Path, key_file: Path, settings: InjectionSettings
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._cert_file, self._key_file = cert_file, key_file
        self._context_lock = threading.Lock()
        self._loaded_mtime = 0.0
        self._context = self._load_context()  # before binding: a bad cert binds nothing
        super().__init__((host.strip("[]"), int(port)), _Handler)
        self.settings = settings
        self.port: int = self.server_address[1]
        self._thread: threading.Thread | None = None

    def _load_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._cert_file, self._key_file)
        self._loaded_mtime = self._cert_file.stat().st_mtime
        return context

    def _current_context(self) -> ssl.SSLContext:
        with self._context_lock:
            try:
                if self._cert_file.stat().st_mtime != self._loaded_mtime:
                    self._context = self._load_context()
                    log.info("webhook certificate reloaded from %s", self._cert_file)
            except (OSError, ssl.SSLError) as exc:  # mid-rotation: keep serving the old one
                log.warning("webhook certificate not reloaded: %s", exc)
            return self._context

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(_HANDSHAKE_TIMEOUT_S)
        try:
            tls = self._current_context().wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", client_address, exc)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="webhook", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(5)


def run(args: argparse.Namespace) -> int:
    """`pointsman webhook`: serves until SIGTERM or Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s webhook %(levelname)s %(message)s")
    try:
        settings = InjectionSettings(
            image=args.image, router=args.router, native_sidecar=args.native_sidecar
        )
        server = WebhookServer(args.listen, Path(args.cert), Path(args.key), settings)
    except (ConfigError, OSError, ssl.SSLError, ValueError) as exc:
        print(f"pointsman webhook: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    host = args.listen.rpartition(":")[0]
    print(f"pointsman webhook listening on https://{host}:{server.port}/mutate", flush=True)
    stop.wait()
    server.stop()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default="0.0.0.0:8443",
        metavar="HOST:PORT",
        help="HTTPS address (default 0.0.0.0:8443)",
    )
    parser.add_argument(
        "--cert",
        required=True,
        metavar="FILE",
        help="TLS certificate (PEM), reloaded when it changes",
    )
    parser.add_argument("--key", required=True, metavar="FILE", help="TLS private key (PEM)")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="the sidecar's container image")
    parser.add_argument(
        "--router",
        default=DEFAULT_ROUTER,
        metavar="HOST:PORT",
        help="default router address (annotation pointsman.io/router overrides)",
    )
    parser.add_argument(
        "--native-sidecar",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="inject an init container with restartPolicy: Always (Kubernetes >= 1.29); "
        "--no-native-sidecar injects a regular container",
    )
