"""`pointsman top`: a live terminal view of the fleet, from the router.

Every refresh asks the router for `ListInstances` and `ListModels` and draws three parts:

- instances: health, data age, loaded models and versions, queued requests, inferences per
  second, memory used against the budget;
- models: ready copies, versions, the route table's weights and generation, and the share of
  prompt blocks found in the models' prefix caches over the last seconds (prefix hits);
- recent decisions: the route-table changes seen between refreshes, newest first (a table
  that changes twice between two refreshes shows once, at its latest generation).

A router that does not answer is shown as such, with the last view it gave, and asked again
at the next refresh. Ctrl-C (or SIGTERM) exits 0. `--once` prints one frame and exits 0, or 1
when the router did not answer.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

import grpc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from pointsman.tls import TlsConfig, sync_channel

__all__ = ["DecisionLog", "FleetView", "RouterClient", "TopState", "render", "run_top"]

_NEVER_MS = 2**32 - 1  # the router's data_age_ms for an instance never reached
_MIB = 1024 * 1024
_STATE_NAMES = {
    pb.MODEL_STATE_LOADING: "loading",
    pb.MODEL_STATE_UNLOADING: "unloading",
    pb.MODEL_STATE_UNAVAILABLE: "unavailable",
}


@dataclass(frozen=True)
class FleetView:
    """One answer of the router: every instance and every model."""

    instances: tuple[pb.Instance, ...]
    models: tuple[pb.ModelSummary, ...]


class RouterClient:
    """The two read-only router calls `top` makes, over one channel."""

    def __init__(self, address: str, timeout_s: float, tls: TlsConfig | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = sync_channel(address, tls)
        self._stub = pb_grpc.RouterServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def fetch(self) -> FleetView:
        """Raises grpc.RpcError when the router does not answer."""
        instances = self._stub.ListInstances(pb.ListInstancesRequest(), timeout=self.timeout_s)
        models = self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s)
        return FleetView(tuple(instances.instances), tuple(models.models))

    def close(self) -> None:
        self._channel.close()


def describe_table(model: pb.ModelSummary) -> str:
    """'gen 12: codegen -> triton-0 1.00, triton-1 0.85'."""
    if not model.HasField("route_table"):
        return f"{model.model_name}: no route table"
    table = model.route_table
    targets = ", ".join(f"{c.target.instance_id} {c.weight:.2f}" for c in table.candidates)
    return f"gen {table.generation}: {model.model_name} -> {targets or 'no ready instance'}"


@dataclass(frozen=True)
class Decision:
    at: float  # wall-clock seconds
    text: str


class DecisionLog:
    """The route-table changes observed between refreshes, newest first.

    The first view seeds the log with every current table: those are the decisions in force.
    """

    def __init__(self, keep: int = 8) -> None:
        self.entries: deque[Decision] = deque(maxlen=keep)
        self._generations: dict[str, int] = {}
        # The placement controller's latest decision time per model, to log each one once.
        self._placed: dict[str, int] = {}

    def observe(self, models: Sequence[pb.ModelSummary], now: float) -> None:
        seen: dict[str, int] = {}
        changes = []
        for model in models:
            generation = model.route_table.generation if model.HasField("route_table") else -1
            seen[model.model_name] = generation
            if self._generations.get(model.model_name) != generation:
                changes.append(Decision(now, describe_table(model)))
            placed = model.last_decision
            acted = placed.decided_unix_ms and placed.action in ("load", "unload")
            if acted and self._placed.get(model.model_name) != placed.decided_unix_ms:
                self._placed[model.model_name] = placed.decided_unix_ms
                where = f" on {placed.instance_id}" if placed.instance_id else ""
                changes.append(
                    Decision(
                        placed.decided_unix_ms / 1000,
                        f"placement: {placed.action} {model.model_name}{where}: {placed.reason}",
                    )
                )
        for name in sorted(self._generations.keys() - seen.keys()):
            changes.append(Decision(now, f"{name}: gone from every repository index"))
        self._generations = seen
        # Newest refresh first; within one refresh, in the router's (model name) order.
        self.entries.extendleft(reversed(changes))


@dataclass
class TopState:
    """What the screen shows: the last view, the last error, the decisions seen so far."""

    router: str
    interval_s: float
    view: FleetView | None = None
    error: str = ""
    answered_at: float | None = None
    decisions: DecisionLog = field(default_factory=DecisionLog)

    def refresh(self, client: RouterClient, now: float) -> bool:
        """Asks the router once; True when it answered."""
        try:
            view = client.fetch()
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            self.error = f"{code.name if code else 'error'}: {details}"
            return False
        self.view, self.error, self.answered_at = view, "", now
        self.decisions.observe(view.models, now)
        return True


def _seconds(ms: int) -> str:
    return "never" if ms >= _NEVER_MS else f"{ms / 1000:.1f}s"


def _memory(instance: pb.Instance) -> Text:
    used = instance.memory_used_bytes / _MIB
    budget = instance.memory_budget_bytes / _MIB
    if not instance.memory_budget_bytes:
        return Text(f"{used:.0f} MiB")
    share = instance.memory_used_bytes / instance.memory_budget_bytes
    style = "red" if share > 0.95 else "yellow" if share > 0.8 else ""
    return Text(f"{used:.0f} / {budget:.0f} MiB ({share:.0%})", style=style)


def _loaded(instance: pb.Instance) -> Text:
    """One line per model: 'codegen v1 v2', versions not ready marked with their state."""
    by_model: dict[str, list[pb.LoadedModel]] = {}
    for model in instance.models:
        by_model.setdefault(model.model_name, []).append(model)
    text = Text()
    for name in sorted(by_model):
        if text:
            text.append("\n")
        text.append(name)
        for model in by_model[name]:
            state = _STATE_NAMES.get(model.state)
            text.append(f" v{model.model_version}", style="yellow" if state else "")
            if state:
                text.append(f" ({state})", style="yellow")
    return text or Text("-", style="dim")


def _instances_table(view: FleetView) -> Table:
    table = Table(title="instances", title_justify="left", expand=True)
    table.add_column("instance", no_wrap=True)
    table.add_column("health", no_wrap=True)
    table.add_column("data age", justify="right", no_wrap=True)
    table.add_column("models and versions")
    table.add_column("pending", justify="right")
    table.add_column("inf/s", justify="right")
    table.add_column("memory used / budget", justify="right", no_wrap=True)
    for inst in view.instances:
        health = (
            Text("ok", style="green")
            if inst.healthy
            else Text(f"down {inst.last_error}"[:48], style="bold red")
        )
        table.add_row(
            inst.instance_id,
            health,
            _seconds(inst.data_age_ms),
            _loaded(inst),
            str(inst.pending_requests),
            f"{inst.inferences_per_second:.1f}",
            _memory(inst),
        )
    return table


def _models_table(view: FleetView) -> Table:
    table = Table(title="models", title_justify="left", expand=True)
    table.add_column("model", no_wrap=True)
    table.add_column("copies", justify="right")
    table.add_column("target", justify="right")
    table.add_column("req/s", justify="right")
    table.add_column("ready on")
    table.add_column("loading on")
    table.add_column("versions")
    table.add_column("route weights")
    table.add_column("gen", justify="right")
    table.add_column("prefix hits", justify="right")
    for model in view.models:
        route = model.route_table
        weights = "\n".join(f"{c.target.instance_id} {c.weight:.2f}" for c in route.candidates)
        copies = len(model.ready_instances)
        table.add_row(
            model.model_name,
            Text(str(copies), style="" if copies else "bold red"),
            str(model.target_copies),
            f"{model.demand_rps:.1f}",
            ", ".join(model.ready_instances) or "-",
            ", ".join(model.loading_instances) or "-",
            " ".join(model.ready_versions) or "-",
            weights or Text("no route", style="red"),
            str(route.generation) if model.HasField("route_table") else "-",
            f"{model.prefix_cache_hit_ratio:.0%}" if model.prefix_cache_lookup_blocks else "-",
        )
    return table


def render(state: TopState, now: float) -> RenderableType:
    """The whole screen for `state` at wall-clock time `now`."""
    header = Text.assemble(("pointsman top", "bold"), f"  router {state.router}  ")
    if state.error:
        header.append(f"unreachable ({state.error}), retrying every {state.interval_s:g}s", "red")
        if state.answered_at is not None:
            header.append(f"; last answer {now - state.answered_at:.0f}s ago", "red")
    else:
        clock = time.strftime("%H:%M:%S", time.localtime(state.answered_at or now))
        header.append(f"refreshed {clock}, every {state.interval_s:g}s", "dim")
    if state.view is None:
        return Group(header, Text("no answer from the router yet", style="dim"))
    decisions = Text()
    for entry in state.decisions.entries:
        if decisions:
            decisions.append("\n")
        decisions.append(time.strftime("%H:%M:%S ", time.localtime(entry.at)), "dim")
        decisions.append(entry.text)
    return Group(
        header,
        _instances_table(state.view),
        _models_table(state.view),
        Panel(decisions or Text("none yet", style="dim"), title="recent decisions"),
    )


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_top(
    router: str,
    *,
    interval_s: float = 1.0,
    once: bool = False,
    console: Console | None = None,
    clock: Callable[[], float] = time.time,
    tls: TlsConfig | None = None,
) -> int:
    """Draws the fleet until Ctrl-C (0), or one frame with `once` (0; 1 if no answer).
    `tls`: the channel's TLS when the router serves TLS."""
    if console is None:
        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(width=160)  # scripts and pipes: no 80-column wrapping
    state = TopState(router, interval_s)
    client = RouterClient(router, timeout_s=min(max(interval_s, 1.0), 5.0), tls=tls)
    try:
        if once:
            answered = state.refresh(client, clock())
            console.print(render(state, clock()))
            return 0 if answered else 1
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        with Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                started = time.monotonic()
                state.refresh(client, clock())
                live.update(render(state, clock()), refresh=True)
                time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
