"""The pages a reader reads (README.md and docs/*.md) and their fenced code blocks, for the tests that run them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(language: str) -> list[tuple[Path, str]]:
    """Every ```language block of every page, with its page."""
    pattern = re.compile(rf"^```{language}\n(.*?)^```", re.DOTALL | re.MULTILINE)
    return [(page, block) for page in PAGES for block in pattern.findall(page.read_text())]
