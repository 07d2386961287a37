"""SegFormer: the Hugging Face Mix Transformer encoder and all-MLP decode head, and its pretrained weights.

See `offroadseg.models` for the surface every model shares and for what `pretrained=` accepts.
"""

from __future__ import annotations

import os
import re

import torch

from ..classes import CLASS_NAMES, NUM_CLASSES
from .base import PretrainedUnavailable, SegmentationModel, check_options, looks_like_hub_id, upsample

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


def build_segformer(variant: str, num_classes: int, pretrained, options: dict) -> SegFormer:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation  # noqa: PLC0415 (transformers takes seconds to import; only SegFormer needs it)

    size = SEGFORMER_SIZES[variant]
    defaults = {"drop_path": 0.1, "decoder_hidden_size": size["decoder_hidden_size"], "dropout": 0.1}
    options = check_options(f"segformer-{variant}", options, defaults)
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
    hub_id = source if looks_like_hub_id(source) else f"nvidia/mit-{variant}"
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
    import transformers  # noqa: PLC0415 (transformers takes seconds to import; only SegFormer needs it)

    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": torch.float32}


def _key_names(entries) -> list[str]:
    """Key names of a loading-info list, whichever form it takes: transformers 5 lists mismatched keys
    as (key, checkpoint shape, model shape) tuples, 4.51 as plain key strings."""
    return [entry if isinstance(entry, str) else entry[0] for entry in entries]


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
    from transformers import SegformerForSemanticSegmentation  # noqa: PLC0415 (transformers takes seconds to import; only SegFormer needs it)

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
    elif not looks_like_hub_id(source):
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
                import huggingface_hub  # noqa: PLC0415 (only when the hub is tried)

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
