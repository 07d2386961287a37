"""Segmentation models behind one factory: SegFormer, DeepLabV3 and DeepLabV3+.

    model = build_model("segformer-b2", num_classes=10, pretrained="weights/mit-b2", drop_path=0.2)
    logits = model(x)                                  # (N, 10, H, W) at the input's resolution
    logits, features = model(x, return_features=True)  # features: 5 maps, see below

Every model has the same surface, whatever its family:

- `forward(x)` takes a normalised float batch (N, 3, H, W) (ImageNet mean/std,
  see `offroadseg.augment`) and returns logits upsampled (bilinear,
  align_corners=False) to (H, W).
- `forward(x, return_features=True)` returns `(logits, features)`, `features`
  being five maps for knowledge distillation: the encoder's four stage outputs
  (shallow to deep) and then the decoder's fused map, the last map before the
  1x1 classifier. The stages carry what the encoder sees at each scale; the
  fused map is what the classifier reads, i.e. the teacher's final
  representation. Matching the deepest stage and the fused map is the usual
  choice (`features[-2:]`); the rest are there for students that want more.
  `feature_channels` and `feature_strides` (relative to the input) describe the
  five maps, so a student can build 1x1 projections onto a teacher's channels
  and resize to its spatial size.
- `.encoder` and `.decoder` hold the two halves' weights (decoder pruning works
  on `.decoder`); `.spec` = {"name", "num_classes", "options"} rebuilds the
  architecture: `build_model(**model.spec)` (weights then come from a checkpoint).

Families and why they look the way they do:

- `segformer-b0` ... `segformer-b5`: Hugging Face `SegformerModel` (Mix
  Transformer) with the published MiT sizes, and its all-MLP decode head.
  Options: `drop_path` (stochastic depth, default 0.1 as in the paper; the
  reference used 0.2), `decoder_hidden_size` (256 for b0/b1, 768 for b2-b5),
  `dropout` (before the classifier, default 0.1).
- `deeplabv3-resnet50/101`: torchvision's DeepLabV3 exactly (ResNet at output
  stride 8, `DeepLabHead`, no auxiliary head), rebuilt from its parts so the
  encoder can return all four stages. Option: `output_stride` (8 or 16).
- `deeplabv3plus-resnet18/34/50/101`: ASPP on the ResNet's last stage at output
  stride 16, plus the DeepLabV3+ decoder (stride-4 features reduced to 48
  channels, concatenated with the upsampled ASPP output, two 3x3 convs, 1x1
  classifier). torchvision's BasicBlock (ResNet-18/34) refuses dilation, so
  for those the strides of the last stage(s) are removed and the 3x3 convs
  dilated after construction, following torchvision's own rule for Bottleneck
  nets; the weights are untouched, so ImageNet weights still fit. Options:
  `output_stride` (8, 16 or 32), `atrous_rates` (default (6, 12, 18) at stride
  16, doubled at 8, halved at 32), `aspp_channels` (256), `decoder_channels`
  (256), `low_level_channels` (48).

Pretrained weights (`pretrained=`) never fall back to random initialisation:
when they cannot be had, `PretrainedUnavailable` says what was tried and how
to supply a local copy.

- SegFormer: a hub id ("nvidia/mit-b2" encoder-only, or a full
  "nvidia/segformer-b2-finetuned-ade-512-512") or a local folder written by
  `save_pretrained`; `True` means "nvidia/mit-<variant>". The whole encoder
  must load (a checkpoint of another size is an error); decoder weights are
  taken where they fit (the classifier never does with 10 classes) and are
  fresh otherwise. `HF_HUB_OFFLINE=1` is honoured at call time.
- DeepLab: ImageNet weights for the ResNet encoder only: a torchvision weights
  name ("IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT"; `True` means "DEFAULT"),
  downloaded into torch's hub cache, or a local .pth/.pt file holding a
  torchvision ResNet `state_dict()` (the `fc.*` entries are ignored).
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead

from .classes import CLASS_NAMES, NUM_CLASSES

# Published MiT (SegFormer) sizes. All variants share heads (1, 2, 5, 8),
# sequence-reduction ratios (8, 4, 2, 1), patch sizes (7, 3, 3, 3), strides
# (4, 2, 2, 2) and MLP ratio 4: the HF config defaults, stated below anyway.
SEGFORMER_SIZES = {
    "b0": dict(depths=(2, 2, 2, 2), hidden_sizes=(32, 64, 160, 256), decoder_hidden_size=256),
    "b1": dict(depths=(2, 2, 2, 2), hidden_sizes=(64, 128, 320, 512), decoder_hidden_size=256),
    "b2": dict(depths=(3, 4, 6, 3), hidden_sizes=(64, 128, 320, 512), decoder_hidden_size=768),
    "b3": dict(depths=(3, 4, 18, 3), hidden_sizes=(64, 128, 320, 512), decoder_hidden_size=768),
    "b4": dict(depths=(3, 8, 27, 3), hidden_sizes=(64, 128, 320, 512), decoder_hidden_size=768),
    "b5": dict(depths=(3, 6, 40, 3), hidden_sizes=(64, 128, 320, 512), decoder_hidden_size=768),
}
DEEPLABV3_DEPTHS = (50, 101)
DEEPLABV3PLUS_DEPTHS = (18, 34, 50, 101)

MODEL_NAMES: tuple[str, ...] = (
    *(f"segformer-{v}" for v in SEGFORMER_SIZES),
    *(f"deeplabv3-resnet{d}" for d in DEEPLABV3_DEPTHS),
    *(f"deeplabv3plus-resnet{d}" for d in DEEPLABV3PLUS_DEPTHS),
)


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights were asked for but could not be loaded (offline, missing, wrong shapes)."""


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_model(name: str, num_classes: int = NUM_CLASSES, pretrained=None, **options) -> nn.Module:
    """Build a segmentation model by name (see `MODEL_NAMES` and the module docstring).

    `options` are the family's small knobs (e.g. `drop_path=0.2`); they may also
    come as one dict under `options=`, the form `model.spec` stores, so that
    `build_model(**model.spec)` rebuilds a model. The model is returned in
    training mode.
    """
    options = {**(options.pop("options", None) or {}), **options}
    if name.startswith("segformer-") and name[len("segformer-") :] in SEGFORMER_SIZES:
        model = _build_segformer(name[len("segformer-") :], num_classes, pretrained, options)
    elif name.startswith("deeplabv3-resnet") and _depth(name) in DEEPLABV3_DEPTHS:
        model = _build_deeplab(DeepLabV3, _depth(name), num_classes, pretrained, options)
    elif name.startswith("deeplabv3plus-resnet") and _depth(name) in DEEPLABV3PLUS_DEPTHS:
        model = _build_deeplab(DeepLabV3Plus, _depth(name), num_classes, pretrained, options)
    else:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    model.spec = {"name": name, "num_classes": num_classes, "options": dict(model.options)}
    return model.train()


def _depth(name: str) -> int | None:
    match = re.fullmatch(r"deeplabv3(?:plus)?-resnet(\d+)", name)
    return int(match.group(1)) if match else None


# CUDA's channels-last bilinear kernel (upsample_bilinear2d_nhwc) indexes with 32-bit ints and
# refuses an input or output of INT_MAX elements or more; SegFormer's decoder maps are
# channels-last (a transposed linear projection), so B2 at 960x540 fails from ~87 images.
UPSAMPLE_MAX_ELEMENTS = 2**31 - 1


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of an (N, C, H, W) batch to `size`, safe at any batch size.

    When the input or the output would reach `UPSAMPLE_MAX_ELEMENTS`, the batch is resized in
    chunks that each stay below it, then concatenated: the same values (each sample is resized
    on its own anyway) in the same memory format, so the fast channels-last kernel is kept.
    Only when a single sample is that large is the input made contiguous first (the NCHW kernel
    indexes with 64 bits). While tracing or compiling (ONNX export, torch.compile) the plain
    call is made: those emit their own kernels, and a test on the batch size would pin the
    exported graph's dynamic batch.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or x.dim() != 4:
        # `size` as given: int() of a traced shape would freeze the exported graph's dynamic size.
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    size = tuple(int(side) for side in size)
    per_sample = x.shape[1] * max(x.shape[2] * x.shape[3], size[0] * size[1])
    if x.shape[0] * per_sample < UPSAMPLE_MAX_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if per_sample >= UPSAMPLE_MAX_ELEMENTS:
        return F.interpolate(x.contiguous(), size=size, mode="bilinear", align_corners=False)
    chunk = (UPSAMPLE_MAX_ELEMENTS - 1) // per_sample
    return torch.cat([F.interpolate(part, size=size, mode="bilinear", align_corners=False)
                      for part in x.split(chunk)])


def _check_options(name: str, given: dict, defaults: dict) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{name} has no option(s) {unknown}; its options are {sorted(defaults)}")
    return {**defaults, **given}


class SegmentationModel(nn.Module):
    """Encoder + decoder with the shared forward; subclasses define `encode` and `decode`.

    `encode(x)` returns the encoder's four stage maps; `decode(stages)` returns
    `(fused, logits)` at the decoder's own stride.
    """

    feature_channels: list[int]
    feature_strides: list[int]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        stages = self.encode(x)
        fused, logits = self.decode(stages)
        if logits.shape[-2:] != x.shape[-2:]:
            logits = upsample(logits, x.shape[-2:])
        if return_features:
            return logits, [*stages, fused]
        return logits


# ----------------------------------------------------------------------------- SegFormer


class SegFormer(SegmentationModel):
    """SegFormer: HF Mix Transformer encoder and all-MLP decode head, upsampled to the input size.

    `encoder` is a `transformers.SegformerModel`, `decoder` a
    `SegformerDecodeHead`. The decode head is run step by step here (same
    modules, same arithmetic as HF's forward) because distillation needs its
    fused map, which HF's forward does not return.
    """

    def __init__(self, hf_model, options: dict):
        super().__init__()
        config = hf_model.config
        self.encoder = hf_model.segformer
        self.decoder = hf_model.decode_head
        self.options = options
        self.feature_channels = [*config.hidden_sizes, config.decoder_hidden_size]
        self.feature_strides = [4, 8, 16, 32, 4]
        # Checkpoints written under another transformers release name the HF
        # submodules differently; rename their keys on load (see _SEGFORMER_RENAMES).
        self.register_load_state_dict_pre_hook(_rename_segformer_keys)

    def encode(self, x):
        return list(self.encoder(x, output_hidden_states=True).hidden_states)

    def decode(self, stages):
        head = self.decoder
        # `linear_c` became `linear_projections` in transformers 5.x; both hold per-stage MLPs.
        projections = head.linear_projections if hasattr(head, "linear_projections") else head.linear_c
        size = stages[0].shape[-2:]
        maps = []
        for stage, projection in zip(stages, projections):
            n, _, h, w = stage.shape
            y = projection(stage).transpose(1, 2).reshape(n, -1, h, w)
            maps.append(upsample(y, size))
        fused = head.activation(head.batch_norm(head.linear_fuse(torch.cat(maps[::-1], dim=1))))
        return fused, head.classifier(head.dropout(fused))


def _build_segformer(variant: str, num_classes: int, pretrained, options: dict) -> SegFormer:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    size = SEGFORMER_SIZES[variant]
    defaults = {"drop_path": 0.1, "decoder_hidden_size": size["decoder_hidden_size"], "dropout": 0.1}
    options = _check_options(f"segformer-{variant}", options, defaults)
    config = SegformerConfig(
        num_labels=num_classes,
        depths=list(size["depths"]),
        hidden_sizes=list(size["hidden_sizes"]),
        num_attention_heads=[1, 2, 5, 8],
        sr_ratios=[8, 4, 2, 1],
        patch_sizes=[7, 3, 3, 3],
        strides=[4, 2, 2, 2],
        mlp_ratios=[4, 4, 4, 4],
        decoder_hidden_size=options["decoder_hidden_size"],
        drop_path_rate=options["drop_path"],
        classifier_dropout_prob=options["dropout"],
        semantic_loss_ignore_index=255,
    )
    if num_classes == NUM_CLASSES:
        config.id2label = dict(enumerate(CLASS_NAMES))
        config.label2id = {v: k for k, v in config.id2label.items()}
    if pretrained is None or pretrained is False:
        hf_model = SegformerForSemanticSegmentation(config)
    else:
        source = f"nvidia/mit-{variant}" if pretrained is True else str(pretrained)
        hf_model = _load_segformer(source, config, variant)
    return SegFormer(hf_model, options)


def _segformer_help(source: str, variant: str) -> str:
    hub_id = source if _looks_like_hub_id(source) else f"nvidia/mit-{variant}"
    folder = f"weights/{hub_id.split('/')[-1]}"
    return (
        f"To use it offline, download it on a machine with internet: "
        f"`python -m offroadseg.weights download --model segformer-{variant} --pretrained {hub_id} --to weights` "
        f"(or by hand: `from transformers import {segformer_hub_class(hub_id)} as M; "
        f"M.from_pretrained('{hub_id}').save_pretrained('{folder}')`), "
        f"copy the folder here and pass pretrained='{folder}' (./run_all.sh: --weights weights)."
    )


def segformer_hub_class(hub_id: str) -> str:
    """The transformers class a SegFormer hub checkpoint is saved as: nvidia's MiT encoders
    ("nvidia/mit-b2") are ImageNet classifiers, the others ("...-finetuned-ade-512-512") segmenters."""
    return "SegformerForImageClassification" if hub_id.split("/")[-1].startswith("mit-") else "SegformerForSemanticSegmentation"


def _from_pretrained_dtype() -> dict:
    """The keyword that makes from_pretrained load in fp32: `dtype` from transformers 5 on, `torch_dtype`
    before (5.x would keep a checkpoint's fp16; 4.x takes no `dtype`)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": torch.float32}


def _key_names(entries) -> list[str]:
    """Key names of a loading-info list, whichever form it takes: transformers 5 lists mismatched keys
    as (key, checkpoint shape, model shape) tuples, 4.51 as plain key strings."""
    return [entry if isinstance(entry, str) else entry[0] for entry in entries]


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None and not source.startswith(".")


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so that
    # setting it later (a notebook cell, a test) still keeps us off the network.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _load_segformer(source: str, config, variant: str):
    """A SegformerForSemanticSegmentation with `config`'s architecture and `source`'s weights.

    Order: a local folder; else the hub id from the local HF cache; else (unless
    HF_HUB_OFFLINE) the hub, after a quick reachability probe, because a
    download attempt without network retries for about a minute and a half
    before failing with a misleading "no file named ..." message.
    """
    from transformers import SegformerForSemanticSegmentation

    def load(where, local_only):
        return SegformerForSemanticSegmentation.from_pretrained(
            where,
            config=config,
            # Only the classifier (and a decoder of another width) may differ; the check below
            # turns any encoder mismatch into an error instead of a silent re-initialisation.
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            local_files_only=local_only,
            **_from_pretrained_dtype(),  # train in fp32 (+ autocast) whatever the checkpoint's dtype
        )

    def unavailable(what, error):
        return PretrainedUnavailable(
            f"could not load SegFormer weights from {what}: {type(error).__name__}: {error}. "
            + _segformer_help(source, variant)
        )

    folder = os.path.expanduser(source)
    if os.path.isdir(folder):
        try:
            hf_model, info = load(folder, True)
        except Exception as error:
            raise unavailable(f"local folder {folder!r}", error) from error
    elif not _looks_like_hub_id(source):
        raise PretrainedUnavailable(
            f"SegFormer weights {source!r}: no such folder (expected one written by save_pretrained). "
            + _segformer_help(source, variant)
        )
    else:
        what = f"hub id {source!r} (there is no local folder of that name)"
        try:
            hf_model, info = load(source, True)  # the HF cache, no network
        except Exception as cache_error:
            if _hub_offline():
                raise unavailable(what + ", not in the HF cache and HF_HUB_OFFLINE is set", cache_error) from cache_error
            try:
                import huggingface_hub

                huggingface_hub.model_info(source, timeout=10)
                hf_model, info = load(source, False)
            except Exception as error:  # unreachable hub, unknown or gated repo
                raise unavailable(what, error) from error
    encoder_prefix = "segformer."
    missing = [k for k in _key_names(info["missing_keys"]) if k.startswith(encoder_prefix)]
    mismatched = [k for k in _key_names(info["mismatched_keys"]) if k.startswith(encoder_prefix)]
    if missing or mismatched:
        example = (missing + mismatched)[0]
        raise PretrainedUnavailable(
            f"SegFormer weights {source!r} do not fit segformer-{variant}: {len(missing)} encoder tensors "
            f"missing and {len(mismatched)} of another shape (e.g. {example}); is it a checkpoint of "
            f"another size? " + _segformer_help(f"nvidia/mit-{variant}", variant)
        )
    return hf_model


# transformers renamed SegFormer's submodules in the 5.x series (stages/blocks,
# q_proj/k_proj/v_proj/o_proj, ...). These pairs (old, new) mirror the renames in
# transformers' own conversion table, relative to our `encoder.` / `decoder.`.
_SEGFORMER_RENAMES = (
    (r"^encoder\.encoder\.patch_embeddings\.(\d+)\.", r"encoder.stages.\1.patch_embeddings."),
    (r"^encoder\.encoder\.block\.(\d+)\.", r"encoder.stages.\1.blocks."),
    (r"^encoder\.encoder\.layer_norm\.(\d+)\.", r"encoder.stages.\1.layer_norm."),
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.self\.sr\.", ".attention.sequence_reduction.sequence_reduction."),
    (r"\.attention\.self\.layer_norm\.", ".attention.sequence_reduction.layer_norm."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"\.layer_norm_1\.", ".layernorm_before."),
    (r"\.layer_norm_2\.", ".layernorm_after."),
    (r"^decoder\.linear_c\.", "decoder.linear_projections."),
)
# The reverse direction, for loading a new-style checkpoint into an old transformers.
_SEGFORMER_RENAMES_BACK = (
    (r"^encoder\.stages\.(\d+)\.patch_embeddings\.", r"encoder.encoder.patch_embeddings.\1."),
    (r"^encoder\.stages\.(\d+)\.blocks\.", r"encoder.encoder.block.\1."),
    (r"^encoder\.stages\.(\d+)\.layer_norm\.", r"encoder.encoder.layer_norm.\1."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".mlp.dense1."),
    (r"\.mlp\.fc2\.", ".mlp.dense2."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
    (r"^decoder\.linear_projections\.", "decoder.linear_c."),
)


def _rename_segformer_keys(module, state_dict, prefix, *args):
    """Load-time hook: rename a checkpoint's SegFormer keys to this transformers' layout."""
    own = {prefix + k for k in module.state_dict()}
    if all(k in own for k in state_dict if k.startswith(prefix)):
        return
    renames = _SEGFORMER_RENAMES if hasattr(module.encoder, "stages") else _SEGFORMER_RENAMES_BACK
    for key in [k for k in state_dict if k.startswith(prefix) and k not in own]:
        new = key[len(prefix) :]
        for pattern, replacement in renames:
            new = re.sub(pattern, replacement, new)
        if prefix + new in own:
            state_dict[prefix + new] = state_dict.pop(key)


# ----------------------------------------------------------------------------- DeepLab


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without its pooling and fc, returning the four stage outputs.

    Submodule names equal torchvision's, so a ResNet `state_dict()` (minus
    `fc.*`) loads directly. `output_stride` 32, 16 or 8 replaces the last
    strides with dilation.
    """

    def __init__(self, depth: int, output_stride: int = 32):
        super().__init__()
        dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}[output_stride]
        builder = getattr(torchvision.models, f"resnet{depth}")
        if depth >= 50:
            resnet = builder(weights=None, replace_stride_with_dilation=dilate)
        else:
            resnet = builder(weights=None)
            _dilate_basic_blocks(resnet, dilate)
        for part in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, part, getattr(resnet, part))
        width = 4 if depth >= 50 else 1  # Bottleneck expansion
        self.channels = [64 * width, 128 * width, 256 * width, 512 * width]
        self.strides = [4, 8, min(16, output_stride), output_stride]

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


def _dilate_basic_blocks(resnet, dilate):
    """Trade stride for dilation in a BasicBlock ResNet, as torchvision does for Bottleneck.

    torchvision's BasicBlock raises on dilation > 1, so the convs are changed
    after construction: a dilated stage's first block loses its stride and
    keeps the previous dilation, later blocks use the new one.
    """
    dilation = 1
    for layer, flag in zip((resnet.layer2, resnet.layer3, resnet.layer4), dilate):
        if not flag:
            continue
        previous, dilation = dilation, dilation * 2
        for index, block in enumerate(layer):
            d = previous if index == 0 else dilation
            if index == 0:
                block.conv1.stride = (1, 1)
                if block.downsample is not None:
                    block.downsample[0].stride = (1, 1)
            for conv in (block.conv1, block.conv2):
                conv.dilation, conv.padding = (d, d), (d, d)


class DeepLabV3(SegmentationModel):
    """DeepLabV3 as torchvision builds it: dilated ResNet (output stride 8) and `DeepLabHead`."""

    def __init__(self, depth: int, num_classes: int, options: dict):
        super().__init__()
        options = _check_options(f"deeplabv3-resnet{depth}", options, {"output_stride": 8})
        self.options = options
        self.encoder = ResNetEncoder(depth, options["output_stride"])
        # DeepLabHead = ASPP, 3x3 conv, BN, ReLU, 1x1 classifier (torchvision, rates 12/24/36).
        self.decoder = DeepLabHead(self.encoder.channels[-1], num_classes)
        self.feature_channels = [*self.encoder.channels, 256]
        self.feature_strides = [*self.encoder.strides, options["output_stride"]]

    def encode(self, x):
        return self.encoder(x)

    def decode(self, stages):
        fused = stages[-1]
        for layer in list(self.decoder)[:-1]:
            fused = layer(fused)
        return fused, self.decoder[-1](fused)


class DeepLabV3PlusDecoder(nn.Module):
    """ASPP on the deepest map, fused with stride-4 features (Chen et al. 2018, ResNet variant)."""

    def __init__(self, in_channels, low_level_in, num_classes, atrous_rates, aspp_channels, low_level_channels, channels):
        super().__init__()
        self.aspp = ASPP(in_channels, list(atrous_rates), aspp_channels)
        self.low_level = nn.Sequential(
            nn.Conv2d(low_level_in, low_level_channels, 1, bias=False),
            nn.BatchNorm2d(low_level_channels),
            nn.ReLU(inplace=True),
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(aspp_channels + low_level_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, low, deep):
        low = self.low_level(low)
        deep = upsample(self.aspp(deep), low.shape[-2:])
        fused = self.fuse(torch.cat([deep, low], dim=1))
        return fused, self.classifier(fused)


class DeepLabV3Plus(SegmentationModel):
    """DeepLabV3+: dilated ResNet (output stride 16), ASPP, low-level decoder at stride 4."""

    def __init__(self, depth: int, num_classes: int, options: dict):
        super().__init__()
        defaults = {
            "output_stride": 16,
            "atrous_rates": None,
            "aspp_channels": 256,
            "decoder_channels": 256,
            "low_level_channels": 48,
        }
        options = _check_options(f"deeplabv3plus-resnet{depth}", options, defaults)
        if options["atrous_rates"] is None:
            # Rates scale with resolution: (6, 12, 18) at stride 16 as in the paper.
            scale = 16 // options["output_stride"] if options["output_stride"] <= 16 else 0.5
            options["atrous_rates"] = [int(r * scale) for r in (6, 12, 18)]
        options["atrous_rates"] = list(options["atrous_rates"])
        self.options = options
        self.encoder = ResNetEncoder(depth, options["output_stride"])
        self.decoder = DeepLabV3PlusDecoder(
            in_channels=self.encoder.channels[-1],
            low_level_in=self.encoder.channels[0],
            num_classes=num_classes,
            atrous_rates=options["atrous_rates"],
            aspp_channels=options["aspp_channels"],
            low_level_channels=options["low_level_channels"],
            channels=options["decoder_channels"],
        )
        self.feature_channels = [*self.encoder.channels, options["decoder_channels"]]
        self.feature_strides = [*self.encoder.strides, 4]

    def encode(self, x):
        return self.encoder(x)

    def decode(self, stages):
        return self.decoder(stages[0], stages[-1])


def _build_deeplab(cls, depth: int, num_classes: int, pretrained, options: dict) -> SegmentationModel:
    model = cls(depth, num_classes, options)
    if pretrained is not None and pretrained is not False:
        source = "DEFAULT" if pretrained is True else str(pretrained)
        _load_resnet(model.encoder, depth, source)
    return model


def _resnet_help(depth: int) -> str:
    return (
        f"To use ImageNet weights offline, save them on a machine with internet: "
        f"`python -m offroadseg.weights download --model deeplabv3plus-resnet{depth} --pretrained DEFAULT --to weights` "
        f"and pass the weights folder (./run_all.sh: --weights weights), or by hand: "
        f"`import torch, torchvision; torch.save(torchvision.models.resnet{depth}(weights='DEFAULT').state_dict(), "
        f"'weights/resnet{depth}.pth')`, copy the file here and pass pretrained='weights/resnet{depth}.pth'."
    )


def _load_resnet(encoder: ResNetEncoder, depth: int, source: str) -> None:
    """Load ResNet weights into `encoder`: a torchvision weights name or a local state_dict file."""
    enum = torchvision.models.get_model_weights(f"resnet{depth}")
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise PretrainedUnavailable(f"could not read ResNet weights file {path!r}: {error}. " + _resnet_help(depth)) from error
        if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
            state = state.get("state_dict", state.get("model"))
        tried = f"file {path!r}"
    elif source in enum.__members__:
        try:
            state = enum[source].get_state_dict(progress=False)
        except Exception as error:  # offline: URLError and friends
            cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum[source].url))
            raise PretrainedUnavailable(
                f"could not get torchvision weights resnet{depth} {source} (download to {cached} "
                f"failed: {type(error).__name__}: {error}). " + _resnet_help(depth)
                + f" (Or copy {enum[source].url} to {cached}.)"
            ) from error
        tried = f"torchvision {enum.__name__}.{source}"
    elif _looks_like_hub_id(source) and os.sep not in source and "." not in source:
        raise ValueError(f"unknown ResNet weights {source!r}; use one of {list(enum.__members__)} or a .pth file")
    else:
        raise PretrainedUnavailable(f"ResNet weights file {path!r} does not exist. " + _resnet_help(depth))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise PretrainedUnavailable(
            f"ResNet weights from {tried} do not fit resnet{depth} (expected a torchvision resnet{depth} "
            f"state_dict): {error}. " + _resnet_help(depth)
        ) from error
