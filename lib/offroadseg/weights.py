"""Pretrained weights in one folder: which files a profile needs, where they lie, how to fetch them.

A weights folder holds each pretrained source under the name its publisher gives it, so that a
machine without internet (a Kaggle session without it, CI, an air-gapped box) trains exactly what
one with internet would:

    weights/mit-b2/                  SegformerForImageClassification.from_pretrained("nvidia/mit-b2")
                                     .save_pretrained("weights/mit-b2")  (the hub's MiT encoders)
    weights/mit-b1/                  the same for "nvidia/mit-b1"
    weights/resnet101-cd907fc2.pth   torchvision's ResNet101_Weights.IMAGENET1K_V2: the file torch hub
                                     downloads and caches, same name, same bytes

Write it on a machine with internet, then copy it (or upload it as a Kaggle dataset):

    python -m offroadseg.weights download --profile full --to weights/
    python -m offroadseg.weights download --model segformer-b1 --pretrained nvidia/mit-b1 --to weights/

and point the pipeline at it: `./run_all.sh --weights weights/` (the notebooks' `weights`
parameter, `chapters.assembly.model_plan(..., weights_dir=...)`). With a folder given, a plan's hub id or
torchvision weights name resolves to its entry there and the hub is never asked; a missing entry
is an error naming the file expected and the command that writes it. Without one, nothing changes:
`pretrained` goes to `models.build_model` as it is (hub cache, then the hub).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from tqdm.auto import tqdm

from .models import SEGFORMER_SIZES, PretrainedUnavailable, looks_like_hub_id, model_depth, segformer_hub_class
from .profiles import PROFILES, Profile, get_profile

ROLES = ("segformer", "deeplab", "student")


@dataclass(frozen=True)
class WeightsEntry:
    """One pretrained source as it lies in a weights folder."""

    model: str  # the model it is for, e.g. "segformer-b2"
    source: str  # what was asked for, normalised: "nvidia/mit-b2", "IMAGENET1K_V2"
    name: str  # its name in the folder: "mit-b2" (a folder), "resnet101-cd907fc2.pth" (a file)
    url: str | None = None  # torchvision's download URL (ResNet entries)

    @property
    def is_folder(self) -> bool:
        return self.url is None

    def describe(self) -> str:
        if self.is_folder:
            return f"a folder written by {segformer_hub_class(self.source)}.from_pretrained({self.source!r}).save_pretrained()"
        return f"torchvision's resnet weights {self.source} as torch hub caches them ({self.url})"

    def command(self, folder: str | os.PathLike) -> str:
        return (f"python -m offroadseg.weights download --model {self.model} --pretrained {self.source} "
                f"--to {folder}")


def entry_for(model: str, pretrained) -> WeightsEntry | None:
    """The weights-folder entry that `pretrained` (as a ModelPlan or build_model takes it) stands for.

    None when there is none: no pretrained weights (None/False), or a source with no place in a weights
    folder (a path; a name models.build_model will reject with its own message).
    """
    if pretrained is None or pretrained is False:
        return None
    if model.startswith("segformer-") and model[len("segformer-"):] in SEGFORMER_SIZES:
        source = f"nvidia/mit-{model[len('segformer-'):]}" if pretrained is True else str(pretrained)
        if not looks_like_hub_id(source):
            return None
        return WeightsEntry(model, source, source.split("/")[-1])
    depth = model_depth(model)
    if depth is not None:
        source = "DEFAULT" if pretrained is True else str(pretrained)
        enum = torchvision.models.get_model_weights(f"resnet{depth}")
        if source not in enum.__members__:
            return None
        url = enum[source].url
        return WeightsEntry(model, source, os.path.basename(url), url)
    return None


def is_complete(path: Path, entry: WeightsEntry) -> bool:
    """Whether `path` holds the finished entry. Downloads land under temporary names and are renamed
    when complete, so a present name means a finished download (or a copy made by hand)."""
    if not entry.is_folder:
        return path.is_file()
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def resolve(model: str, pretrained, weights_dir: str | os.PathLike | None):
    """`pretrained` for `models.build_model`, resolved inside `weights_dir` when one is given.

    Without a folder `pretrained` comes back unchanged. With one, an existing local path stays as it
    is (the user chose that file); a hub id or torchvision weights name becomes the absolute path of
    its entry, or `PretrainedUnavailable` names the entry expected and the command that writes it.
    """
    if weights_dir is None or pretrained is None or pretrained is False:
        return pretrained
    if isinstance(pretrained, str) and os.path.exists(os.path.expanduser(pretrained)):
        return pretrained
    entry = entry_for(model, pretrained)
    if entry is None:
        return pretrained
    folder = Path(weights_dir).expanduser().resolve()
    path = folder / entry.name
    if is_complete(path, entry):
        return str(path)
    state = "is incomplete (no config.json and weights file)" if path.exists() else "is missing"
    raise PretrainedUnavailable(
        f"{model}: pretrained {entry.source!r} should be {path} ({entry.describe()}), and it {state}. "
        f"On a machine with internet run `{entry.command(folder)}` (or `python -m offroadseg.weights download "
        f"--profile full --to {folder}` for every file of the full profile) and copy the result into {folder}."
    )


def entries(profile: Profile) -> list[WeightsEntry]:
    """The weights-folder entries a profile's plans need (each once, in role order)."""
    found: dict[str, WeightsEntry] = {}
    for role in ROLES:
        plan = getattr(profile, role)
        entry = entry_for(plan.name, plan.pretrained)
        if entry is not None:
            found.setdefault(entry.name, entry)
    return list(found.values())


def download(wanted: list[WeightsEntry], to: str | os.PathLike, progress: bool = True) -> list[Path]:
    """Fetch each entry into the folder `to`, skipping those already there. Returns their paths.

    Each lands under a temporary name and is renamed when complete, so an interrupted download never
    looks finished (run the command again: it resumes with what is missing).
    """
    folder = Path(to).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    bar = tqdm(wanted, desc="weights", unit="file", disable=not progress)
    for entry in bar:
        path = folder / entry.name
        bar.set_postfix_str(entry.name)
        if is_complete(path, entry):
            bar.write(f"{path}: already there, skipped")
        elif path.exists():
            raise FileExistsError(f"{path} exists but is incomplete (no config.json and weights file): "
                                  "remove it and run the download again")
        elif entry.is_folder:
            _download_segformer(entry, path)
        else:
            # torch hub's own downloader: a temporary ".partial" file beside `path`, the SHA-256 prefix in
            # torchvision's file name checked, then moved into place.
            torch.hub.download_url_to_file(entry.url, str(path), hash_prefix=_hash_prefix(entry.name),
                                           progress=progress)
        paths.append(path)
    return paths


def _hash_prefix(file_name: str) -> str | None:
    stem = file_name.rsplit(".", 1)[0]
    prefix = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    return prefix if prefix and all(c in "0123456789abcdef" for c in prefix) else None


def _download_segformer(entry: WeightsEntry, path: Path) -> None:
    # Saved as the hub has it: the MiT checkpoints are image classifiers (encoder + ImageNet head), of
    # which models.segformer._load_segformer takes the encoder and starts the decode head fresh.
    import transformers  # noqa: PLC0415 (transformers takes seconds to import; only this download needs it)

    cls = getattr(transformers, segformer_hub_class(entry.source))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        model = cls.from_pretrained(entry.source)
        model.save_pretrained(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; give it a plain mkdir's permissions
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offroadseg.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="download pretrained weights into a weights folder")
    fetch.add_argument("--to", required=True, help="the weights folder (created if missing)")
    fetch.add_argument("--profile", default=None, choices=sorted(PROFILES),
                       help="every pretrained file of this profile (default: full, unless --model is given)")
    fetch.add_argument("--model", help="one model's weights instead, e.g. segformer-b1 (with --pretrained)")
    fetch.add_argument("--pretrained", help="its source: a hub id (nvidia/mit-b1) or torchvision name (IMAGENET1K_V2)")
    args = parser.parse_args(argv)
    if (args.model is None) != (args.pretrained is None):
        parser.error("--model and --pretrained go together")
    wanted = []
    if args.model is not None:
        entry = entry_for(args.model, args.pretrained)
        if entry is None:
            parser.error(f"{args.model} with pretrained {args.pretrained!r}: nothing to download "
                         "(a SegFormer takes a hub id, a DeepLab a torchvision weights name)")
        wanted.append(entry)
    if args.profile is not None or args.model is None:
        wanted += [e for e in entries(get_profile(args.profile or "full")) if e.name not in {w.name for w in wanted}]
    try:
        paths = download(wanted, args.to)
    except OSError as error:  # offline, a proxy, a hub outage: say it in one line, with the way round it
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"python -m offroadseg.weights: could not fetch into {args.to}: {reason}\n"
              "This command needs internet: run it on a machine that has it, carry the folder, and give it "
              "with --weights DIR (what was complete is kept; run it again to fetch the rest)", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
