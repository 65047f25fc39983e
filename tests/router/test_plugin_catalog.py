"""router/plugins/README.md lists every registered plugin as the registry describes it."""

from __future__ import annotations

from router.plugins.catalog import BEGIN, END, README, render, replace_catalogue
from router.plugins.registry import PluginKind, default_registry


def test_readme_catalogue_is_the_registrys() -> None:
    text = README.read_text()
    expected = replace_catalogue(text, render(default_registry()))
    assert text == expected, "run: python -m router.plugins.catalog --write"


def test_catalogue_has_a_section_per_type_with_what_it_reads() -> None:
    registry = default_registry()
    catalogue = render(registry)
    for kind in PluginKind:
        for type_name in registry.type_names(kind):
            assert f"### `{type_name}` ({kind.value})" in catalogue
    assert "- **Reads (CONSUMES):** `candidate.assumed_inflight`, `model.pending_requests`" in (
        catalogue
    )
    assert catalogue.count("- **Parameters:**") == sum(
        len(registry.type_names(kind)) for kind in PluginKind
    )


def test_replace_catalogue_keeps_the_text_around_it() -> None:
    text = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert replace_catalogue(text, "new\n") == f"intro\n{BEGIN}\n\nnew\n\n{END}\noutro\n"
