"""mkdocs hook: the config reference in search.md is rendered from the typed config at build time."""

from __future__ import annotations

from ptune_search.config_reference import render_config_reference

MARKER = "<!-- config-reference -->"


def on_page_markdown(markdown: str, **_: object) -> str:
    return markdown.replace(MARKER, render_config_reference()) if MARKER in markdown else markdown
