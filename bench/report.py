"""Results of a benchmark run and how they are written: JSON, a markdown table, a PNG plot.

A scenario returns a `ScenarioResult`: tables (what the markdown shows), bar groups (what the
plot draws), target checks (stated, never asserted) and notes. `write_report` writes
`results.json`, `results.md` and `results.png` into one folder, each with the machine's
description, so a figure never travels without the machine it was measured on.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# The results.json layout, documented in bench/README.md ("Result schema"); bump on a change.
SCHEMA = "pointsman-bench/2"

__all__ = [
    "SCHEMA",
    "BarGroup",
    "BenchRun",
    "MachineInfo",
    "Provenance",
    "ScenarioResult",
    "Table",
    "TargetCheck",
    "format_cell",
    "machine_info",
    "provenance",
    "ratio",
    "render_markdown",
    "scenario_from_json",
    "utc_now",
    "write_report",
]


@dataclass(frozen=True, slots=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...]


@dataclass(frozen=True, slots=True)
class BarGroup:
    """One subplot: a value per label, e.g. p99 ms per system."""

    title: str
    ylabel: str
    labels: tuple[str, ...]
    values: tuple[float, ...]
    log_scale: bool = False


@dataclass(frozen=True, slots=True)
class TargetCheck:
    name: str
    target: str
    measured: str
    met: bool | None  # None: could not be measured in this run


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    name: str
    title: str
    tables: tuple[Table, ...] = ()
    bars: tuple[BarGroup, ...] = ()
    targets: tuple[TargetCheck, ...] = ()
    notes: tuple[str, ...] = ()
    # Everything measured, as plain data, for the JSON file.
    data: dict[str, object] = field(default_factory=dict)
    wall_s: float = math.nan  # how long the scenario ran, start to end


@dataclass(frozen=True, slots=True)
class MachineInfo:
    cpu_model: str
    cores: int
    memory_bytes: int
    os: str
    python: str
    pointsman: str
    nvidia_pytriton: str
    triton_server: str  # from a running server's metadata; "" when none ran

    def describe(self) -> str:
        gib = self.memory_bytes / 2**30
        triton = f", Triton {self.triton_server}" if self.triton_server else ""
        return (
            f"{self.cpu_model}, {self.cores} cores, {gib:.1f} GiB, {self.os}, "
            f"Python {self.python}, nvidia-pytriton {self.nvidia_pytriton}{triton}"
        )


@dataclass(frozen=True, slots=True)
class Provenance:
    """Which code measured, and how busy the machine was."""

    commit: str  # `git rev-parse HEAD`, "" outside a git checkout
    dirty: bool  # uncommitted changes to tracked files when the run started
    loadavg_start: tuple[float, float, float]  # 1, 5, 15 minutes
    loadavg_end: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    dirty_paths: tuple[str, ...] = ()  # which tracked files differed from the commit


@dataclass(frozen=True, slots=True)
class BenchRun:
    command: str
    started_utc: str
    machine: MachineInfo
    scenarios: tuple[ScenarioResult, ...]
    provenance: Provenance | None = None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _memory_bytes(meminfo: str) -> int:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _os_name() -> str:
    try:
        distribution = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        distribution = ""
    kernel = f"{platform.system()} {platform.release()}"
    return f"{kernel} ({distribution})" if distribution else kernel


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.rstrip("\n")  # not strip(): porcelain lines start with a space


def provenance(loadavg_end: tuple[float, float, float] | None = None) -> Provenance:
    """The commit and dirtiness of this checkout, and the load average now (as the start)."""
    changed = _git("status", "--porcelain", "--untracked-files=no").splitlines()
    return Provenance(
        commit=_git("rev-parse", "HEAD"),
        dirty=bool(changed),
        dirty_paths=tuple(line[3:] for line in changed),
        loadavg_start=os.getloadavg(),
        loadavg_end=loadavg_end or (math.nan, math.nan, math.nan),
    )


def machine_info(triton_server: str = "") -> MachineInfo:
    # The cores this process may use (a container's or taskset's limit), not the host's.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return MachineInfo(
        cpu_model=_cpu_model(_read("/proc/cpuinfo")),
        cores=cores or 1,
        memory_bytes=_memory_bytes(_read("/proc/meminfo")),
        os=_os_name(),
        python=platform.python_version(),
        pointsman=_version("pointsman"),
        nvidia_pytriton=_version("nvidia-pytriton"),
        triton_server=triton_server,
    )


def format_cell(value: object) -> str:
    """Numbers with sensible precision; NaN and None as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def _markdown_table(table: Table) -> list[str]:
    lines = [f"**{table.title}**", ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in table.columns) + "|")
    for row in table.rows:
        lines.append("| " + " | ".join(format_cell(v).replace("|", "/") for v in row) + " |")
    lines.append("")
    return lines


def render_markdown(run: BenchRun) -> str:
    lines = [
        "# Pointsman benchmark",
        "",
        f"- command: `{run.command}`",
        f"- started: {run.started_utc}",
        f"- machine: {run.machine.describe()}",
    ]
    if run.provenance:
        p = run.provenance
        state = f" (uncommitted changes: {', '.join(p.dirty_paths)})" if p.dirty else ""
        lines.append(f"- commit: {p.commit or 'unknown'}{state}")
        lines.append(
            "- load average (1, 5, 15 min): start "
            + ", ".join(f"{v:.2f}" for v in p.loadavg_start)
            + "; end "
            + ", ".join(f"{v:.2f}" for v in p.loadavg_end)
        )
    lines.append("")
    for scenario in run.scenarios:
        lines += [f"## {scenario.title}", ""]
        for table in scenario.tables:
            lines += _markdown_table(table)
        if scenario.targets:
            lines += _markdown_table(
                Table(
                    "Targets (reported, not asserted)",
                    ("target", "wanted", "measured", "met"),
                    tuple(
                        (t.name, t.target, t.measured, "n/a" if t.met is None else t.met)
                        for t in scenario.targets
                    ),
                )
            )
        lines += [f"- {note}" for note in scenario.notes]
        if math.isfinite(scenario.wall_s):
            lines.append(f"- ran {scenario.wall_s:.1f} s")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _jsonable(value: object) -> object:
    """NaN and infinities are not JSON: NaN (not measured) becomes null, an infinite latency
    (a timeout in the tail) the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _number(value: object) -> float:
    """A figure read back from results.json: null is NaN, "inf" infinite."""
    if value is None:
        return math.nan
    return float(value) if isinstance(value, int | float | str) else math.nan


def scenario_from_json(entry: dict[str, Any]) -> ScenarioResult:
    """One scenario of a results.json, as the `ScenarioResult` it was written from (figures
    that were NaN or infinite come back as such in the bars; tables and data keep the JSON
    forms, null and "inf", which render and write the same)."""
    return ScenarioResult(
        name=entry["name"],
        title=entry["title"],
        tables=tuple(
            Table(t["title"], tuple(t["columns"]), tuple(tuple(row) for row in t["rows"]))
            for t in entry["tables"]
        ),
        bars=tuple(
            BarGroup(
                b["title"],
                b["ylabel"],
                tuple(b["labels"]),
                tuple(_number(v) for v in b["values"]),
                b["log_scale"],
            )
            for b in entry["bars"]
        ),
        targets=tuple(TargetCheck(**t) for t in entry["targets"]),
        notes=tuple(entry["notes"]),
        data=dict(entry["data"]),
        wall_s=_number(entry.get("wall_s")),
    )


def _plot(run: BenchRun, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    groups: list[tuple[str, BarGroup]] = [(s.title, g) for s in run.scenarios for g in s.bars]
    if not groups:
        groups = [("no figures", BarGroup("nothing measured", "", (), ()))]
    columns = min(3, len(groups))
    rows = math.ceil(len(groups) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    for ax, (scenario_title, group) in zip(axes.flat, groups, strict=False):
        values = [v if math.isfinite(v) else 0.0 for v in group.values]  # inf: labelled, not drawn
        bars = ax.bar(range(len(values)), values, color=[f"C{i % 10}" for i in range(len(values))])
        ax.set_xticks(range(len(values)), group.labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{scenario_title}\n{group.title}", fontsize=9)
        ax.set_ylabel(group.ylabel, fontsize=8)
        if group.log_scale and any(v > 0 for v in values):
            ax.set_yscale("log")
        ax.bar_label(bars, labels=[format_cell(v) for v in group.values], fontsize=7)
    figure.suptitle(f"Pointsman benchmark: {run.machine.describe()}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(run: BenchRun, out_dir: Path, *, plot: bool = True) -> list[Path]:
    """Writes results.json, results.md and (with `plot`) results.png into `out_dir`; returns
    their paths. Without matplotlib (the `bench` extra) the PNG is left out, with a message."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out_dir / f"results.{ext}" for ext in ("json", "md", "png"))
    document = {
        "schema": SCHEMA,
        "command": run.command,
        "started_utc": run.started_utc,
        "provenance": asdict(run.provenance) if run.provenance else None,
        "machine": asdict(run.machine),
        "scenarios": [asdict(s) for s in run.scenarios],
    }
    json_path.write_text(json.dumps(_jsonable(document), indent=2) + "\n")
    md_path.write_text(render_markdown(run))
    if not plot:
        return [json_path, md_path]
    try:
        _plot(run, png_path)
    except ImportError:
        print(
            "pointsman bench: matplotlib is not installed, so no PNG "
            "(pip install 'pointsman[bench]')",
            file=sys.stderr,
        )
        return [json_path, md_path]
    return [json_path, md_path, png_path]


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def ratio(value: float, baseline: float) -> float:
    """value / baseline, NaN when either is missing or the baseline is 0."""
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline == 0:
        return math.nan
    return value / baseline
