"""Helpers of the chapter tests (tests/test_chapters_*.py): a small run as the notebooks leave it."""

import numpy as np
import torch
from PIL import Image

from offroadseg import runs
from offroadseg.chapters import assembly, context
from offroadseg.checkpoints import save_checkpoint
from offroadseg.dataset import eval_loader
from offroadseg.files import read_json, write_json
from offroadseg.models import build_model
from offroadseg.scan import scan_dataset

SIZE = (16, 24)  # the model input of these runs

TINY = {"name": "deeplabv3plus-resnet18", "options": {"output_stride": 32, "aspp_channels": 8, "decoder_channels": 8}}


def start(project, step: str):
    """The notebook's context.start with the small input, and the run's scan.json as notebook 01 writes it."""
    ctx = context.start(step, run="r", profile="demo", data=project / "data", image_size=list(SIZE))
    if not ctx.run.scan.exists():
        write_json(ctx.run.scan, scan_dataset(project / "data", workers=1, progress=False))
    return ctx


def tiny_checkpoint(path, seed: int = 0) -> None:
    """best.pt of a tiny untrained model, as engine.fit writes it (spec and weights) for load_model."""
    torch.manual_seed(seed)
    model = build_model(TINY["name"], **TINY["options"])
    save_checkpoint({"spec": model.spec, "model": model.state_dict()}, path)


def trained_run(ctx, with_ensemble: bool = True) -> None:
    """Checkpoints of both teachers and the student, and ensemble.json, as notebooks 02-05 leave a run."""
    for seed, role in enumerate(("segformer", "deeplab", "student")):
        (ctx.run.model_dir(role)).mkdir(parents=True)
        tiny_checkpoint(ctx.run.model_dir(role) / "best.pt", seed)
    if with_ensemble:
        val = {"ensemble": {"miou": 0.5, "pixel_acc": 0.8, "per_class_iou": {}, "ms_per_image": 30.0, "params": 10}}
        runs.write_ensemble(ctx.run, 0.25, [], flips=["h"], scales=None, flip_candidates=[], input_size=SIZE, val=val)


def loader_of(ctx, native: bool = False):
    scan = read_json(ctx.run.scan)
    return eval_loader(assembly.val_dataset(scan, SIZE, native_masks=native), batch_size=2)


def unlabelled_folder(root, count: int = 3):
    """A plain folder of images without masks, as a user gives `adapt`."""
    root.mkdir(parents=True)
    for index in range(count):
        image = np.random.default_rng(index).integers(0, 255, (12, 20, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / f"new{index:03d}.png")
    (root / "notes.txt").write_text("not an image")
    return root
