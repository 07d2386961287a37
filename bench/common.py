"""Shared bits of the benchmark scripts: machine description, JSON results and small helpers.

Devices and precision are not chosen here: the scripts take them from the library's one rule,
`offroadseg.device` (default_device, precision_name, inference_autocast, synchronize).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import tempfile
from pathlib import Path

from offroadseg.files import write_json
from offroadseg.runs import package_versions

ROLES = ("segformer", "deeplab", "student")


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
        if torch.cuda.is_available():  # a description of the machine, not a choice of device
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
            info["cudnn"] = torch.backends.cudnn.version()
    except ImportError:
        pass
    return info


def save_results(name: str, rows: list[dict], out: str | None = None, **extra) -> Path:
    """Write bench/results/<name>.json (or `out`); a run with quick=True goes to bench/results/quick/<name>.json,
    so smoke runs never overwrite real measurements."""
    folder = Path(__file__).parent / "results" / ("quick" if extra.get("quick") else "")
    path = Path(out) if out else folder / f"{name}.json"
    write_json(path, {"benchmark": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "machine": machine(), "versions": package_versions(), **extra, "rows": rows})
    return path


def add_output_options(parser, name: str) -> None:
    """--out (the JSON of the whole run) and --jsonl/--label (each row as soon as it is measured)."""
    parser.add_argument("--out", default=None, help=f"JSON results path (default bench/results/{name}.json)")
    parser.add_argument("--jsonl", default=None, help="also append each row, as soon as it is measured, to this "
                        "JSON lines file (a run cut short keeps every row it finished)")
    parser.add_argument("--label", default=name, help=f"the rows' label in --jsonl (default {name})")


class Results:
    """A benchmark's rows as they are measured: `add` appends each at once to the JSON lines file
    `jsonl` ({"label", "benchmark", "row"} a line, flushed to disk: a process killed a second later
    keeps it) and rewrites the whole JSON (`save_results`, with partial=True until `save`)."""

    def __init__(self, name: str, out: str | None = None, jsonl: str | None = None, label: str | None = None,
                 **extra):
        self.name, self.out, self.label, self.extra = name, out, label or name, extra
        self.jsonl = Path(jsonl) if jsonl else None
        self.rows: list[dict] = []
        if self.jsonl is not None:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        if self.jsonl is not None:
            with open(self.jsonl, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"label": self.label, "benchmark": self.name, "row": row}, default=str) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        save_results(self.name, self.rows, self.out, **{**self.extra, "partial": True})
        return row

    def save(self, **more) -> Path:
        """The final JSON (partial=False), with `more` fields."""
        self.extra.update(more)
        return save_results(self.name, self.rows, self.out, **{**self.extra, "partial": False})


def read_jsonl(path) -> list[dict]:
    """The objects of a JSON lines file written by `Results`; a last line cut short is left out."""
    out = []
    path = Path(path)
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


# ------------------------------------------------------------------------ shared helpers


def parse_size(text: str) -> tuple[int, int]:
    """"HxW" -> (height, width)."""
    try:
        height, width = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"size must be HxW (e.g. 160x288), got {text!r}") from None
    return height, width


def size_str(size) -> str:
    return f"{size[0]}x{size[1]}"


def model_label(name: str, options: dict) -> str:
    return name + ("" if not options else " " + ",".join(f"{k}={v}" for k, v in options.items()))


def profile_models(profile, names=None) -> list[dict]:
    """[{"role", "name", "options", "batch_size"}] for `names`: role names (segformer, deeplab, student)
    take the profile's plan (options included, pretrained weights never loaded); any other name is a
    model name built with default options. None: the profile's three roles."""
    out = []
    for name in names or ROLES:
        if name in ROLES:
            plan = getattr(profile, name)
            out.append({"role": name, "name": plan.name, "options": dict(plan.options), "batch_size": plan.batch_size})
        else:
            out.append({"role": "-", "name": name, "options": {}, "batch_size": None})
    return out


@contextlib.contextmanager
def demo_data(data: str | None, quick: bool):
    """The dataset root to use: `data` if given; with `quick`, a tiny desert in a temporary folder
    (12 images at 128x72, removed afterwards); else data/demo_desert, generated if missing."""
    if data:
        yield Path(data)
        return
    from offroadseg.synth import make_demo_desert

    if quick:
        with tempfile.TemporaryDirectory(prefix="bench-desert-") as tmp:
            make_demo_desert(tmp, counts={"train": 8, "val": 2, "test": 2}, size=(128, 72), workers=1, progress=False)
            yield Path(tmp)
        return
    root = Path(__file__).resolve().parent.parent / "data" / "demo_desert"
    if not root.exists():
        print(f"generating the demo desert into {root} ...", flush=True)
        make_demo_desert(root)
    yield root
