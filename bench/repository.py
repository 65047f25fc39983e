"""Model repositories made at run time: copies of `codegen` (or `codegen_stream`) by name.

A benchmark needs several models that cost the same and differ only in name and weights. Each
copy is the shipped model's config with its name, its own weight seed, one version, optionally
no dynamic batcher, and optionally another declared footprint (`pointsman.memory_bytes`, which
the model allocates, so the footprint is real memory); its model.py links to the shipped one,
so the shipped models are never edited. `parameters` replaces the values of named config
parameters (the emulated accelerator of bench.testbed sets the prefill and decode ones).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from app.triton import DEFAULT_MODEL_REPOSITORY

__all__ = ["bench_repository", "copy_names", "model_config", "zipf_popularity"]

_BATCHER = re.compile(r"\ndynamic_batching \{.*?\n\}\n", re.S)
_FOOTPRINT = re.compile(r'(key: "pointsman\.memory_bytes" value: \{ string_value: )"\d+"')


def copy_names(template: str, count: int) -> tuple[str, ...]:
    """`codegen_a`, `codegen_b`, ...: the names of `count` copies of `template`."""
    if not 0 < count <= 26:
        raise ValueError(f"between 1 and 26 copies, got {count}")
    return tuple(f"{template}_{chr(ord('a') + i)}" for i in range(count))


def zipf_popularity(count: int, exponent: float) -> list[float]:
    """Share of requests for the model of each popularity rank (1/rank^s, normalised)."""
    weights = [1 / (rank + 1) ** exponent for rank in range(count)]
    total = sum(weights)
    return [w / total for w in weights]


def model_config(
    template: str,
    name: str,
    seed: int,
    *,
    batcher: bool = True,
    footprint_bytes: int | None = None,
    parameters: Mapping[str, str] | None = None,
) -> str:
    """A shipped model's config as model `name`: one version, its own weight seed, with or
    without the dynamic batcher (its block, queue policy included), with its declared
    footprint replaced when `footprint_bytes` is given, and the value of each parameter named
    in `parameters` replaced (each must be in the shipped config)."""
    source = re.search(r'^name: "([^"]+)"', template, re.M)
    if source is None:
        raise ValueError("the template config has no name")
    text = template.replace(f'name: "{source.group(1)}"', f'name: "{name}"', 1)
    text = re.sub(r"version_policy: \{.*\}\n", "", text, count=1)
    text = re.sub(r'(key: "seed" value: \{ string_value: )"\d+"', rf'\1"{seed}"', text)
    if not batcher:
        text, removed = _BATCHER.subn("\n", text)
        if removed != 1:
            raise ValueError(f"{source.group(1)}'s config has no dynamic_batching block to remove")
    if footprint_bytes is not None:
        text, replaced = _FOOTPRINT.subn(rf'\1"{footprint_bytes}"', text)
        if replaced != 1:
            raise ValueError(f"{source.group(1)}'s config declares no pointsman.memory_bytes")
    for key, value in (parameters or {}).items():
        pattern = rf'(key: "{re.escape(key)}" value: \{{ string_value: )"[^"]*"'
        escaped = value.replace("\\", "\\\\")  # the replacement's only special characters
        text, replaced = re.subn(pattern, rf'\1"{escaped}"', text)
        if replaced != 1:
            raise ValueError(f"{source.group(1)}'s config has no parameter {key!r}")
    return text


def bench_repository(
    root: Path,
    names: Sequence[str],
    *,
    template: str = "codegen",
    batcher: bool = True,
    footprint_bytes: int | None = None,
    parameters: Mapping[str, str] | None = None,
) -> Path:
    """A model repository at `root` of copies of the shipped model `template`, one per name
    (`model_config`'s options); each copy's model.py links to the shipped one."""
    config = (DEFAULT_MODEL_REPOSITORY / template / "config.pbtxt").read_text()
    source = (DEFAULT_MODEL_REPOSITORY / template / "1" / "model.py").resolve()
    root.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "config.pbtxt").write_text(
            model_config(
                config,
                name,
                20240607 + index,
                batcher=batcher,
                footprint_bytes=footprint_bytes,
                parameters=parameters,
            )
        )
        link = root / name / "1" / "model.py"
        if not link.exists():
            link.symlink_to(source)
    return root
