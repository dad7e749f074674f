"""A benchmark's results as it writes them: ``<out>.json`` (the numbers) and ``<out>.md`` (the tables people read,
also printed) side by side, e.g. ``benchmarks/results/brain3d.{json,md}``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def write_report(out: str | Path, data: dict, markdown: str | Sequence[str], echo: bool = True) -> None:
    """Write ``data`` to ``<out>.json`` and ``markdown`` (text, or its lines) to ``<out>.md``, making the folder;
    print the markdown unless not ``echo``. Numbers numpy leaves in ``data`` are written as floats."""
    out = Path(out)
    text = markdown if isinstance(markdown, str) else "\n".join(markdown) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(data, indent=1, default=float))
    out.with_name(out.name + ".md").write_text(text)
    if echo:
        print(text.rstrip("\n"))
