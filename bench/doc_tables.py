"""Where the FAM benches put their results: a CSV of the runs and a table in the docs."""

from __future__ import annotations

import csv
import re
from pathlib import Path


def publish(out: Path, name: str, rows: list[dict], summary: str) -> None:
    """Write ``OUT/NAME.csv`` (one row per run) and replace the text between the markers
    ``<!-- NAME -->`` and ``<!-- /NAME -->`` of ``OUT/finetune.md`` with ``summary``."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    doc = out / "finetune.md"
    text = doc.read_text(encoding="utf-8")
    pattern = re.compile(rf"(<!-- {name} -->\n).*?(<!-- /{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{doc} has no <!-- {name} --> markers")
    doc.write_text(pattern.sub(lambda m: m.group(1) + summary + m.group(2), text), "utf-8")
