import re
import time

import pytest
import torch
import torchvision
from helpers import assert_names

from offroadseg.models import (
    MODEL_NAMES,
    PretrainedUnavailable,
    build_model,
    count_parameters,
)

SMALL = ["segformer-b0", "deeplabv3plus-resnet18", "deeplabv3-resnet50"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def millions(model):
    return round(count_parameters(model) / 1e6, 1)


@pytest.mark.parametrize("name", SMALL)
def test_logits_at_input_resolution_and_features_match_channels(name):
    model = build_model(name)
    x = torch.randn(2, 3, 64, 96)
    logits = model(x)
    assert logits.shape == (2, 10, 64, 96)
    logits2, features = model(x, return_features=True)
    assert logits2.shape == (2, 10, 64, 96)
    assert len(features) == len(model.feature_channels) == len(model.feature_strides) == 5
    for feature, channels, stride in zip(features, model.feature_channels, model.feature_strides):
        assert feature.shape == (2, channels, 64 // stride, 96 // stride)


def test_odd_input_size_still_gives_input_resolution():
    model = build_model("deeplabv3plus-resnet18").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 45, 70)).shape == (1, 10, 45, 70)


@pytest.mark.parametrize("name", ["segformer-b0", "deeplabv3plus-resnet18"])
def test_gradients_reach_encoder_and_decoder(name):
    model = build_model(name, num_classes=4)
    logits, features = model(torch.randn(2, 3, 64, 64), return_features=True)
    assert logits.shape[1] == 4
    (logits.square().mean() + features[-1].mean() + features[-2].mean()).backward()
    for part in (model.encoder, model.decoder):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads[:1] + grads[-1:])
        assert sum(g.abs().sum() for g in grads if g is not None) > 0


def test_encoder_and_decoder_partition_the_parameters():
    for name in ["segformer-b0", "deeplabv3plus-resnet18"]:
        model = build_model(name)
        assert count_parameters(model.encoder) + count_parameters(model.decoder) == count_parameters(model)


def test_segformer_decode_matches_hf_decode_head():
    # Our step-by-step decode (needed for the fused feature) must equal HF's own head.
    model = build_model("segformer-b0").eval()
    with torch.no_grad():
        stages = model.encode(torch.randn(1, 3, 64, 64))
        _, logits = model.decode(stages)
        assert torch.allclose(logits, model.decoder(stages), atol=1e-5)


def test_published_parameter_counts():
    assert millions(build_model("segformer-b2")) == 27.4
    assert millions(build_model("deeplabv3-resnet50")) == 39.6
    assert millions(build_model("deeplabv3-resnet101")) == 58.6
    assert millions(build_model("segformer-b0")) == 3.7
    # Same architecture as torchvision's builder, parameter for parameter.
    reference = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=10, aux_loss=False)
    assert count_parameters(reference) == count_parameters(build_model("deeplabv3-resnet50"))


def test_segformer_sizes_follow_published_configs():
    config = build_model("segformer-b2").encoder.config
    assert list(config.depths) == [3, 4, 6, 3]
    assert list(config.hidden_sizes) == [64, 128, 320, 512]
    assert list(config.num_attention_heads) == [1, 2, 5, 8]
    assert list(config.sr_ratios) == [8, 4, 2, 1]
    assert config.decoder_hidden_size == 768
    assert build_model("segformer-b1").encoder.config.decoder_hidden_size == 256


def test_options_spec_and_rebuild():
    model = build_model("segformer-b0", drop_path=0.2, decoder_hidden_size=64)
    assert model.spec == {
        "name": "segformer-b0",
        "num_classes": 10,
        "options": {"drop_path": 0.2, "decoder_hidden_size": 64, "dropout": 0.1},
    }
    assert model.encoder.config.drop_path_rate == 0.2
    assert model.feature_channels[-1] == 64
    rebuilt = build_model(**model.spec)
    rebuilt.load_state_dict(model.state_dict())  # same architecture, strict
    small = build_model("deeplabv3plus-resnet18", num_classes=3, aspp_channels=32, decoder_channels=32)
    assert small.spec["options"]["aspp_channels"] == 32
    assert count_parameters(small) < count_parameters(build_model("deeplabv3plus-resnet18"))
    build_model(**small.spec).load_state_dict(small.state_dict())


def test_unknown_name_and_option_are_errors():
    with pytest.raises(ValueError, match="segformer-b0.*deeplabv3plus-resnet101"):
        build_model("unet-resnet18")
    with pytest.raises(ValueError, match="valid names"):
        build_model("deeplabv3-resnet18")  # torchvision has no such DeepLabV3
    with pytest.raises(ValueError, match="decoder_hidden_size"):
        build_model("segformer-b0", decoder_width=64)
    assert "segformer-b5" in MODEL_NAMES and "deeplabv3plus-resnet34" in MODEL_NAMES


def test_basic_block_resnet_is_dilated_to_stride_16():
    model = build_model("deeplabv3plus-resnet18")
    assert model.feature_strides[:4] == [4, 8, 16, 16]
    assert model.encoder.layer4[0].conv1.stride == (1, 1)
    assert model.encoder.layer4[1].conv2.dilation == (2, 2)
    os32 = build_model("deeplabv3plus-resnet18", output_stride=32)
    _, features = os32(torch.randn(2, 3, 64, 64), return_features=True)
    assert features[3].shape[-1] == 2 and os32.spec["options"]["atrous_rates"] == [3, 6, 9]


def test_segformer_checkpoint_from_other_transformers_layout_loads():
    # transformers renamed SegFormer's submodules in 5.x; a checkpoint in the other major's layout
    # (older under 5.x, newer under 4.x) is renamed on load.
    from offroadseg.models.segformer import _SEGFORMER_RENAMES, _SEGFORMER_RENAMES_BACK

    source, target = build_model("segformer-b0"), build_model("segformer-b0")
    to_other = _SEGFORMER_RENAMES_BACK if hasattr(source.encoder, "stages") else _SEGFORMER_RENAMES
    other_layout = {}
    for key, value in source.state_dict().items():
        for pattern, replacement in to_other:
            key = re.sub(pattern, replacement, key)
        other_layout[key] = value
    assert set(other_layout) != set(source.state_dict())
    target.load_state_dict(other_layout)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


# --------------------------------------------------------------------------- pretrained weights


def _b0_config(**overrides):
    from transformers import SegformerConfig

    return SegformerConfig(depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 160, 256], decoder_hidden_size=256, **overrides)


def test_segformer_loads_local_encoder_only_checkpoint(tmp_path):
    from transformers import SegformerForImageClassification

    source = SegformerForImageClassification(_b0_config(num_labels=7))  # like nvidia/mit-b0
    source.save_pretrained(tmp_path / "mit-b0")
    model = build_model("segformer-b0", pretrained=str(tmp_path / "mit-b0"), drop_path=0.2)
    expected = source.segformer.state_dict()
    loaded = model.encoder.state_dict()
    assert set(expected) == set(loaded)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert model.encoder.config.drop_path_rate == 0.2
    assert model.training
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10, 64, 64)


def test_segformer_loads_full_checkpoint_except_classifier(tmp_path):
    from transformers import SegformerForSemanticSegmentation

    source = SegformerForSemanticSegmentation(_b0_config(num_labels=150))  # like a finetuned-ade checkpoint
    with torch.no_grad():
        source.decode_head.linear_fuse.weight.normal_()
        for p in source.parameters():  # values that survive a round trip through fp16
            p.copy_(p.half().float())
    source.half().save_pretrained(tmp_path / "segformer-b0-ade")
    source.float()
    model = build_model("segformer-b0", pretrained=tmp_path / "segformer-b0-ade")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp16 checkpoints load as fp32
    for key, value in source.segformer.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    assert torch.equal(model.decoder.linear_fuse.weight, source.decode_head.linear_fuse.weight)
    assert model.decoder.classifier.weight.shape[0] == 10


def test_segformer_checkpoint_of_another_size_is_an_error(tmp_path):
    from transformers import SegformerForImageClassification

    SegformerForImageClassification(_b0_config()).save_pretrained(tmp_path / "mit-b0")
    with pytest.raises(PretrainedUnavailable, match="do not fit segformer-b1"):
        build_model("segformer-b1", pretrained=str(tmp_path / "mit-b0"))


def test_segformer_missing_weights_are_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(PretrainedUnavailable, match="save_pretrained"):
        build_model("segformer-b0", pretrained=str(tmp_path / "no" / "such" / "folder"))
    # A hub id while offline fails fast and says how to bring a local copy.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    start = time.monotonic()
    with pytest.raises(PretrainedUnavailable) as error:
        build_model("segformer-b0", pretrained="nvidia/mit-b0")
    assert_names(error, "nvidia/mit-b0", "save_pretrained('weights/mit-b0')")
    assert time.monotonic() - start < 30


def test_unreachable_hub_fails_fast_with_instructions(monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(PretrainedUnavailable) as error:
        build_model("segformer-b0", pretrained="offroadseg-tests/no-such-model")
    assert_names(error, "ConnectionError", "save_pretrained('weights/no-such-model')")


@pytest.mark.parametrize("depth, name", [(18, "deeplabv3plus-resnet18"), (50, "deeplabv3-resnet50")])
def test_resnet_loads_local_state_dict(tmp_path, depth, name):
    resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    with torch.no_grad():
        for p in resnet.parameters():
            p.normal_()  # unlike any fresh initialisation
        resnet.bn1.running_mean.uniform_()
    torch.save(resnet.state_dict(), tmp_path / f"resnet{depth}.pth")
    model = build_model(name, pretrained=str(tmp_path / f"resnet{depth}.pth"))
    loaded = model.encoder.state_dict()
    expected = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_resnet_missing_or_wrong_weights_are_clear_errors(tmp_path):
    with pytest.raises(PretrainedUnavailable, match=r"does not exist.*torch\.save"):
        build_model("deeplabv3plus-resnet18", pretrained=str(tmp_path / "resnet18.pth"))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(PretrainedUnavailable, match="do not fit resnet34"):
        build_model("deeplabv3plus-resnet34", pretrained=str(tmp_path / "resnet18.pth"))
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        build_model("deeplabv3plus-resnet18", pretrained="IMAGENET_V9")


def _record_interpolate(monkeypatch):
    """Wraps F.interpolate: records each call's (input, output) element counts."""
    import torch.nn.functional as F

    calls = []
    real = F.interpolate

    def recording(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        calls.append((x.numel(), out.numel()))
        return out

    monkeypatch.setattr(F, "interpolate", recording)
    return calls


def test_upsample_splits_a_batch_whose_output_would_pass_the_kernel_limit(monkeypatch):
    # CUDA's channels-last bilinear kernel refuses >= 2^31 elements (B2 at 960x540 from ~87
    # images); a small patched limit stands in for it on the CPU.
    from offroadseg import models

    x = torch.randn(7, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.interpolate(x, size=(10, 12), mode="bilinear", align_corners=False)
    monkeypatch.setattr(models.base, "UPSAMPLE_MAX_ELEMENTS", 4 * 10 * 12 * 3 + 1)  # room for 3 samples' outputs
    calls = _record_interpolate(monkeypatch)
    out = models.upsample(x, (10, 12))
    assert [c[1] for c in calls] == [3 * 480, 3 * 480, 480]  # chunks of 3, 3 and 1
    assert torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the fast layout is kept
    calls.clear()
    assert torch.equal(models.upsample(x[:3], (10, 12)), expected[:3]) and len(calls) == 1  # below: one call
    # A single sample over the limit: one call on a contiguous (NCHW, 64-bit indexed) input.
    monkeypatch.setattr(models.base, "UPSAMPLE_MAX_ELEMENTS", 100)
    calls.clear()
    out = models.upsample(x, (10, 12))
    assert len(calls) == 1 and torch.equal(out, expected)


@pytest.mark.parametrize("name", ["segformer-b0", "deeplabv3plus-resnet18"])
def test_forward_never_upsamples_more_than_the_kernel_limit_at_once(monkeypatch, name):
    from offroadseg import models

    model = build_model(name, **({"decoder_hidden_size": 16} if name.startswith("segformer") else
                                 {"aspp_channels": 16, "decoder_channels": 16, "low_level_channels": 8})).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 48).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        limit = 10 * 32 * 48 * 2 + 1  # the logits of two images
        monkeypatch.setattr(models.base, "UPSAMPLE_MAX_ELEMENTS", limit)
        calls = _record_interpolate(monkeypatch)
        logits = model(x)
    assert calls and all(i < limit and o < limit for i, o in calls)
    assert torch.allclose(logits, expected, atol=1e-6)
