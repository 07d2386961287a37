"""Shared bits of the benchmark scripts: machine description and JSON results."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

from offroadseg.files import write_json
from offroadseg.runs import package_versions


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def save_results(name: str, rows: list[dict], out: str | None = None, **extra) -> Path:
    path = Path(out) if out else Path(__file__).parent / "results" / f"{name}.json"
    write_json(path, {"benchmark": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "machine": machine(), "versions": package_versions(), **extra, "rows": rows})
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)
