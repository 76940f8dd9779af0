"""The demo page's texts in Chinese and English, kept in ``page_text.json`` beside this file (key -> {"zh", "en"};
``{name}`` fields are filled in by :func:`tr`). The report's own texts are in ``report.py``."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

LANGS = ("zh", "en")
TEXT_FILE = Path(__file__).with_suffix(".json")


@functools.cache
def texts() -> dict[str, dict[str, str]]:
    """The whole text table (read once, on first use)."""
    return json.loads(TEXT_FILE.read_text(encoding="utf-8"))


def tr(key: str, lang: str, **kw: Any) -> str:
    """The ``lang`` text of ``key`` (``kw`` formatted in)."""
    text = texts()[key]["zh" if lang == "zh" else "en"]
    return text.format(**kw) if kw else text


def page_lang(lang: str | None) -> str:
    """A language the page speaks: "en", else "zh"."""
    return "en" if lang == "en" else "zh"
