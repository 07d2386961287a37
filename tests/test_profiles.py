"""Profiles (offroadseg.profiles): the demo and full set-ups, overrides, and settings where None keeps
the profile's value."""

import dataclasses
import json

import pytest
import torch

from offroadseg.models import MODEL_NAMES, build_model
from offroadseg.profiles import (
    DEMO,
    FULL,
    PROFILES,
    AdaptConfig,
    DistillConfig,
    ModelPlan,
    Profile,
    get_profile,
    with_settings,
)

ROLES = ("segformer", "deeplab", "student")


def test_get_profile_returns_the_one_profile_of_each_name():
    assert get_profile("demo") is DEMO and get_profile("full") is FULL
    assert all(profile.name == name for name, profile in PROFILES.items())  # --profile NAME gives profile NAME


def test_unknown_profile_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="unknown profile 'huge'") as error:
        get_profile("huge")
    assert "demo" in str(error.value) and "full" in str(error.value)
    monkeypatch.setitem(PROFILES, "tiny", DEMO)  # the choices come from PROFILES, listed nowhere else
    with pytest.raises(ValueError, match="tiny"):
        get_profile("huge")


def test_full_profile_is_the_reference_set_up():
    assert FULL.image_size == (512, 512)
    assert (FULL.segformer.name, FULL.deeplab.name, FULL.student.name) == (
        "segformer-b2", "deeplabv3plus-resnet101", "segformer-b1")
    assert FULL.segformer.options == {"drop_path": 0.2}  # the report's drop path rate
    assert (FULL.segformer.pretrained, FULL.student.pretrained) == ("nvidia/mit-b2", "nvidia/mit-b1")
    assert FULL.deeplab.pretrained == "IMAGENET1K_V2"
    assert all(getattr(FULL, role).epochs == 20 for role in ROLES)
    assert FULL.prune_decoder == 0.2 and FULL.patience == 5


def test_demo_profile_trains_small_models_from_scratch_in_process():
    assert DEMO.image_size == (160, 288)
    assert all(getattr(DEMO, role).pretrained is None for role in ROLES)  # hubs are unreachable
    assert DEMO.workers == 0 and DEMO.patience == 0 and DEMO.prune_decoder == 0.0
    # The student starts from a teacher: that teacher must be of the student's own architecture.
    teacher = getattr(DEMO, DEMO.student.init_from)
    assert (teacher.name, teacher.options) == (DEMO.student.name, DEMO.student.options)


@pytest.mark.parametrize("profile", PROFILES.values(), ids=PROFILES.keys())
def test_every_plan_names_a_model_the_factory_builds(profile):
    for role in ROLES:
        plan = getattr(profile, role)
        assert plan.name in MODEL_NAMES, f"{profile.name}.{role}: {plan.name}"
        assert plan.init_from in (None, "segformer", "deeplab")
        assert plan.epochs > 0 and plan.batch_size > 0 and plan.lr > 0
    assert len(profile.image_size) == 2 and all(type(s) is int and s > 0 for s in profile.image_size)


def test_demo_plans_build_with_their_options_and_predict_ten_classes(one_thread):
    torch.manual_seed(0)
    for role in ROLES:
        plan = getattr(DEMO, role)
        model = build_model(plan.name, **plan.options).eval()
        with torch.inference_mode():
            assert model(torch.randn(1, 3, 32, 64)).shape == (1, 10, 32, 64), role


def test_distill_and_adapt_defaults():
    assert DistillConfig() == DistillConfig(alpha=0.5, temperature=2.0, beta=0.5)
    adapt = AdaptConfig()
    assert (adapt.images, adapt.holdout, adapt.threshold, adapt.epochs) == ("auto", None, None, None)
    assert adapt.min_accuracy == 0.95 and adapt.epoch_share == 0.25 and adapt.warmup_epochs == 0.1
    for profile in PROFILES.values():
        assert profile.distill == DistillConfig() and profile.adapt == AdaptConfig()
    plan = ModelPlan("segformer-b0")
    assert (plan.options, plan.pretrained, plan.init_from, plan.epochs) == ({}, None, None, 20)
    assert plan.options is not ModelPlan("segformer-b0").options  # no dict shared between plans


def test_with_settings_keeps_the_profiles_value_where_none():
    plan = with_settings(DEMO.deeplab, epochs=2, lr=None, batch_size=None)
    assert plan.epochs == 2 and plan.lr == DEMO.deeplab.lr and plan.batch_size == DEMO.deeplab.batch_size
    assert plan.name == DEMO.deeplab.name and plan.options == DEMO.deeplab.options
    assert DEMO.deeplab.epochs == 4  # the profile itself is untouched
    assert with_settings(DEMO.distill, alpha=None, temperature=4.0) == DistillConfig(temperature=4.0)
    adapt = with_settings(DEMO.adapt, images="none", threshold=0.9, epochs=None)
    assert (adapt.images, adapt.threshold, adapt.epochs) == ("none", 0.9, None)
    # Falsy values that are not None are settings: 0 epochs of warm-up, beta 0 (no feature matching).
    assert with_settings(DEMO.adapt, warmup_epochs=0).warmup_epochs == 0
    assert with_settings(DEMO.distill, beta=0.0).beta == 0.0
    assert with_settings(DEMO.student) == DEMO.student


def test_with_settings_rejects_unknown_names_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown settings \['depth'\] for ModelPlan") as error:
        with_settings(DEMO.segformer, depth=3)
    assert "'epochs'" in str(error.value)
    with pytest.raises(ValueError, match="for DistillConfig.*'temperature'"):
        with_settings(DEMO.distill, temp=3.0)
    with pytest.raises(ValueError, match="for AdaptConfig"):
        with_settings(DEMO.adapt, image="demo")
    # A None for an unknown name is no setting at all: a notebook's unset parameter is ignored.
    assert with_settings(DEMO.adapt, image=None) == DEMO.adapt


def test_with_overrides_replaces_fields_and_rejects_unknown_ones():
    small = DEMO.with_overrides(image_size=(64, 96), student=ModelPlan("segformer-b0", epochs=1))
    assert small.image_size == (64, 96) and small.student.name == "segformer-b0"
    assert small.segformer == DEMO.segformer and DEMO.image_size == (160, 288)
    with pytest.raises(ValueError, match=r"unknown profile fields \['colour'\]") as error:
        DEMO.with_overrides(colour="red")
    assert "'image_size'" in str(error.value)


def test_profiles_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEMO.workers = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEMO.student.epochs = 1


def test_to_dict_is_plain_json_of_every_field():
    record = FULL.to_dict()
    assert set(record) == {f.name for f in dataclasses.fields(Profile)}
    assert record["student"]["name"] == "segformer-b1" and record["distill"]["temperature"] == 2.0
    assert json.loads(json.dumps(record))["adapt"]["min_accuracy"] == 0.95
