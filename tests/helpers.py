"""Small hand-made datasets in the Duality layout for unit tests (independent of synth)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from offroadseg.classes import RAW_IDS

TRAIN = "Offroad_Segmentation_Training_Dataset"
TEST = "Offroad_Segmentation_testImages"


def split_dir(root: Path, split: str) -> Path:
    return root / (TEST if split == "test" else f"{TRAIN}/{split}")


def stripes_mask(height: int, width: int, classes=range(10)) -> np.ndarray:
    """Vertical stripes of the given class indices, as raw IDs (uint16)."""
    classes = list(classes)
    cols = np.arange(width) * len(classes) // width
    return np.tile(np.asarray([RAW_IDS[c] for c in classes], dtype=np.uint16)[cols], (height, 1))


def write_pair(root: Path, split: str, stem: str, raw: np.ndarray | None = None, image_size=None) -> tuple[Path, Path]:
    folder = split_dir(root, split)
    (folder / "Color_Images").mkdir(parents=True, exist_ok=True)
    (folder / "Segmentation").mkdir(parents=True, exist_ok=True)
    if raw is None:
        raw = stripes_mask(12, 20)
    h, w = raw.shape
    iw, ih = image_size or (w, h)
    image = np.random.default_rng(abs(hash(stem)) % 2**32).integers(0, 255, (ih, iw, 3), dtype=np.uint8)
    image_path = folder / "Color_Images" / f"{stem}.png"
    mask_path = folder / "Segmentation" / f"{stem}.png"
    Image.fromarray(image).save(image_path)
    Image.fromarray(raw.astype(np.uint16)).save(mask_path)
    return image_path, mask_path


def make_small_dataset(root: Path, n_train: int = 4, n_val: int = 2, n_test: int = 2) -> Path:
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            write_pair(root, split, f"{split}{i:03d}")
    return root


# --------------------------------------------------------------------------- pretrained stand-ins
# Random weights in the hub's and torchvision's real formats, under the names a weights folder uses
# (offroadseg.weights): what `python -m offroadseg.weights download` would write, without a network.

# The published nvidia/mit-bX configurations (config.json on the hub), written out here rather than
# taken from offroadseg.models, so that a wrong size there is caught.
MIT_CONFIGS = {
    "b0": dict(depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 160, 256], decoder_hidden_size=256),
    "b1": dict(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=256),
    "b2": dict(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
}


def write_standin_mit(folder: Path, variant: str, seed: int = 0):
    """A random-weight `SegformerForImageClassification` with nvidia/mit-<variant>'s configuration
    (1000 ImageNet classes), saved with save_pretrained into `folder`. Returns the model."""
    import torch
    from transformers import SegformerConfig, SegformerForImageClassification

    torch.manual_seed(seed)
    config = SegformerConfig(**MIT_CONFIGS[variant], num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1],
                             patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4],
                             drop_path_rate=0.1, num_labels=1000, reshape_last_stage=True,
                             architectures=["SegformerForImageClassification"])
    model = SegformerForImageClassification(config)
    model.save_pretrained(folder)
    return model


def write_standin_resnet(path: Path, depth: int, seed: int = 0) -> dict:
    """A random torchvision resnet<depth> state_dict saved with torch.save (the format torch hub
    caches). Returns the state dict."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    state = getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def write_standin_weights(folder: Path, profile) -> list[Path]:
    """Stand-ins for every pretrained file `profile` needs, in `folder` under the weights-folder names
    (full profile: mit-b2/ 95 MB, mit-b1/ 53 MB, resnet101-cd907fc2.pth 171 MB; 8.8 s measured on the busy
    2-core machine, so a test using it is slow). Returns their paths."""
    from offroadseg import weights

    paths = []
    for entry in weights.entries(profile):
        path = Path(folder) / entry.name
        if entry.is_folder:
            write_standin_mit(path, entry.source.split("mit-")[-1])
        else:
            write_standin_resnet(path, int(entry.model.split("resnet")[-1]))
        paths.append(path)
    return paths


def assert_names(error, *parts) -> str:
    """The message of `error` (an exception, a pytest ExceptionInfo or a string) names every one of
    `parts`: the stable parts a user acts on (the file, the setting and its values, the command or
    advice), not the sentence around them, which may be reworded. Paths are compared as strings.
    Returns the message, for further checks."""
    error = getattr(error, "value", error)  # pytest.raises' ExceptionInfo
    message = str(error)
    missing = [str(part) for part in parts if str(part) not in message]
    assert not missing, f"the message does not name {missing}:\n{message}"
    return message
