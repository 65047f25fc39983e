"""The plugin catalogue of router/plugins/README.md, written from the registry.

    python -m router.plugins.catalog           # print the catalogue
    python -m router.plugins.catalog --write   # rewrite it in router/plugins/README.md

Each entry is the plugin module's docstring (formula, inputs, parameters) and the snapshot
fields the plugin declares (`CONSUMES`). tests/router/test_plugin_catalog.py fails when the
README's catalogue differs from what this writes, so a new plugin cannot be left out of it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from router.plugins.registry import PluginInfo, PluginKind, PluginRegistry, default_registry

__all__ = ["BEGIN", "END", "README", "render", "replace_catalogue"]

README = Path(__file__).with_name("README.md")
BEGIN = "<!-- catalogue: written by `python -m router.plugins.catalog --write`; do not edit -->"
END = "<!-- end of catalogue -->"
# Docstring lines that open a bullet: "Inputs: ...", "Formula (absolute tiers, ...): ...".
_LABEL = re.compile(r"^(Inputs|Formula|Rule|Parameters)\b([^:]*):\s*(.*)$")


def render(registry: PluginRegistry) -> str:
    """The catalogue: one section per registered type, filters, then scorers, then pickers."""
    sections = [
        _section(registry.info(kind, type_name))
        for kind in PluginKind
        for type_name in registry.type_names(kind)
    ]
    return "\n".join(sections)


def _section(plugin: PluginInfo) -> str:
    title, _, body = plugin.doc.partition("\n")
    # "Scorer `load`: prefer ..." -> "Prefer ..."
    summary = title.split(":", 1)[-1].strip()
    lines = [
        f"### `{plugin.type_name}` ({plugin.kind.value})",
        "",
        summary[:1].upper() + summary[1:],
    ]
    if plugin.kind is not PluginKind.PICKER:
        fields = ", ".join(f"`{field}`" for field in sorted(plugin.consumes)) or "none"
        lines += ["", f"- **Reads (CONSUMES):** {fields}"]
    else:
        lines += [""]
    for line in body.strip().splitlines():
        label = _LABEL.match(line)
        if label:
            lines.append(f"- **{label[1]}{label[2]}:** {label[3]}")
        elif lines[-1].startswith(("- ", "  ")):
            lines.append(f"  {line}")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def replace_catalogue(text: str, catalogue: str) -> str:
    """`text` with what lies between BEGIN and END replaced by `catalogue`."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"the README has no catalogue block ({BEGIN} ... {END})")
    return f"{head}{BEGIN}\n\n{catalogue}\n{END}{tail}"


def main(argv: list[str]) -> int:
    catalogue = render(default_registry())
    if argv == ["--write"]:
        README.write_text(replace_catalogue(README.read_text(), catalogue))
    elif argv:
        print("usage: python -m router.plugins.catalog [--write]", file=sys.stderr)
        return 2
    else:
        print(catalogue)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
