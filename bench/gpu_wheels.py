"""The wheels the GPU image lacks for running the notebooks there (papermill, nbval, nbclient,
ipykernel and what they need), carried in the git-ignored `.whl/` folder.

    python bench/gpu_wheels.py fetch [--to .whl]     # download them for CPython 3.12, manylinux x86-64
    python bench/gpu_wheels.py check [--to .whl]     # is the set complete, one version each, under the size limit?

`fetch` starts from ROOTS and follows each wheel's Requires-Dist (markers read for CPython 3.12
on Linux x86-64, no extras) until every requirement is either in the folder or in the image's
own package list (bench/gpu_image_packages.txt, from the device notes). Each wheel takes the
version installed in the Python running this script where there is one (what the tests here
ran), else the newest. Needs pip and the registry (PyPI); runs here, never on the GPU machine.

`check` needs no network: it reads the folder only, and exits 1 naming what is missing or doubled.
On the GPU machine the set is installed with
`python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl`
(bench/gpu_check.sh does it).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent
ROOTS = ("papermill", "nbval", "nbclient", "ipykernel")
# What travels to the device machine in one call, all of it (the working tree included).
LIMIT_BYTES = 64 * 2**20
# What to leave room for: the tracked tree (notebooks with outputs, lib, tests) travels too.
BUDGET_BYTES = 32 * 2**20
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "manylinux1_x86_64")
# The GPU image's interpreter: markers of the requirements are read for it.
TARGET = dict(default_environment(), python_version="3.12", python_full_version="3.12.3", implementation_name="cpython",
              platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
              platform_machine="x86_64", os_name="posix")


def image_packages(path: Path = HERE / "gpu_image_packages.txt") -> set[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return {canonicalize_name(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def wheels(folder: Path) -> dict[str, list[Path]]:
    """{canonical name: [wheel files]} of the folder."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.whl")):
        name = canonicalize_name(parse_wheel_filename(path.name)[0])
        found.setdefault(name, []).append(path)
    return found


def requirements(wheel: Path) -> list[str]:
    """Canonical names a wheel needs on the GPU image (no extras)."""
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = archive.read(meta).decode("utf-8", "replace")
    needed = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or req.marker.evaluate(dict(TARGET, extra="")):
            needed.append(canonicalize_name(req.name))
    return needed


def missing(folder: Path, image: set[str]) -> dict[str, list[str]]:
    """{needed name: [who needs it]} for each requirement neither in the folder nor in the image."""
    have = wheels(folder)
    wanted = {canonicalize_name(r): ["(root)"] for r in ROOTS if canonicalize_name(r) not in have}
    for name, files in have.items():
        for need in requirements(files[0]):
            if need not in have and need not in image:
                wanted.setdefault(need, []).append(name)
    return wanted


def local_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def download(name: str, folder: Path) -> None:
    version = local_version(name)
    spec = f"{name}=={version}" if version else name
    command = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "-d", str(folder)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    print(f"fetch: {spec}", flush=True)
    result = subprocess.run([*command, spec], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"pip download {spec} failed:\n{result.stderr.strip()[-2000:]}\n"
                         f"(no CPython 3.12 manylinux x86-64 wheel of it? try another version, or add a "
                         f"--platform manylinux_2_N_x86_64 to PLATFORMS in {__file__})")


def report(folder: Path, image: set[str]) -> int:
    have = wheels(folder)
    doubled = {name: [p.name for p in files] for name, files in have.items() if len(files) > 1}
    lacking = missing(folder, image)
    also_in_image = sorted(name for name in have if name in image)
    size = sum(p.stat().st_size for files in have.values() for p in files)
    print(f"{folder}: {len(have)} packages, {size / 2**20:.1f} MiB (travel limit {LIMIT_BYTES // 2**20} MiB for the "
          f"whole tree; this set must stay under {BUDGET_BYTES // 2**20} MiB)")
    problems = 0
    for name, who in sorted(lacking.items()):
        print(f"missing: {name} (needed by {', '.join(who)})")
        problems += 1
    for name, files in sorted(doubled.items()):
        print(f"two versions of {name}: {', '.join(files)} (pip install of the folder would stop: delete one)")
        problems += 1
    if size > BUDGET_BYTES:
        print(f"too large: {size / 2**20:.1f} MiB")
        problems += 1
    if also_in_image:
        print(f"note: also in the GPU image (the carried version wins on PYTHONPATH): {', '.join(also_in_image)}")
    print("complete" if not problems else f"{problems} problem(s)")
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("fetch", "check"))
    parser.add_argument("--to", default=str(HERE.parent / ".whl"), help="the wheel folder (default: .whl/ at the repo root)")
    args = parser.parse_args(argv)
    folder = Path(args.to)
    image = image_packages()
    if args.action == "fetch":
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # each round adds what the last round's wheels need
            lacking = missing(folder, image)
            if not lacking:
                break
            for name in sorted(lacking):
                download(name, folder)
    elif not folder.is_dir():
        print(f"{folder}: no such folder; fill it with `bench/fetch_gpu_wheels.sh` (needs PyPI)")
        return 1
    return report(folder, image)


if __name__ == "__main__":
    sys.exit(main())
