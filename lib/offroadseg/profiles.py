"""Profiles: one small dataclass per way of running the pipeline.

`demo` is what a fresh clone runs on 2 CPU cores in minutes (generated desert,
small models from scratch, small inputs); `full` is the reference report's set-up
(SegFormer-B2 and DeepLabV3+ ResNet-101 teachers, ~20 epochs, 512-pixel inputs).
Notebooks take `profile` plus overrides as papermill parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class ModelPlan:
    """What to train for one role (teacher or student) and how."""

    name: str
    options: dict = field(default_factory=dict)
    pretrained: str | None = None
    epochs: int = 20
    batch_size: int = 8
    lr: float = 6e-5
    # Student only: a teacher role ("segformer"/"deeplab") of the same architecture whose best
    # checkpoint initialises the student before distillation (None: `pretrained` or from scratch).
    init_from: str | None = None
    ema: float = 0.0  # decay of a moving average of the weights validated beside them (TrainConfig.ema); 0 = off
    keep_epochs: int = 0  # the last epochs' weights kept for checkpoint averaging (TrainConfig.keep_epochs)


@dataclass(frozen=True)
class DistillConfig:
    """How the student learns from the ensemble (`distill.DistillationLoss`, notebook 05):

    loss = alpha * hard + (1 - alpha) * T^2 * KL(student/T || ensemble/T) + beta * feature matching,
    the hard term being the teachers' loss on the ground truth; beta 0 turns feature matching off.
    """

    alpha: float = 0.5
    temperature: float = 2.0
    beta: float = 0.5


@dataclass(frozen=True)
class AdaptConfig:
    """How the student adapts to a new desert (notebook 05's `adapt*` parameters, `chapters.new_desert`).

    `images`: "auto" (the demo desert's adaptation split on the demo desert, else off), "demo", a
    folder of unlabelled images, or "none" (off). `holdout`: a folder of labelled images of the new
    desert that chooses the adapted student's epoch (None: on the demo, its novel_val split).
    `min_accuracy`: the confidence rule keeps the lowest threshold whose kept val pixels are this
    often right; `threshold` forces one instead. `epochs`: the fine-tune's epochs (None: `epoch_share`
    of the student's, at least 1), after `warmup_epochs` of warm-up (it starts from trained weights).
    `batchnorm`: where the adapted student's BatchNorm statistics are re-estimated after the
    fine-tune: "both" (the new desert's images and as many training images: one model for both
    deserts; over three demo seeds it keeps 0.99-1.04x the student's val mIoU and gains +0.052 on
    the new desert's test images), "new" (those images alone: +0.045 there, but 0.85-0.89x on val)
    or "none" (the fine-tune's own statistics). bench/RESULTS.md, section 8.
    """

    images: str = "auto"
    holdout: str | None = None
    min_accuracy: float = 0.95
    threshold: float | None = None
    epochs: int | None = None
    epoch_share: float = 0.25
    warmup_epochs: float = 0.1
    batchnorm: str = "both"


@dataclass(frozen=True)
class Profile:
    name: str
    image_size: tuple[int, int]  # (height, width) the models see
    segformer: ModelPlan
    deeplab: ModelPlan
    student: ModelPlan
    patience: int = 5  # early stopping: epochs without a val mIoU gain
    prune_decoder: float = 0.0  # fraction of decoder weights L1-pruned (reference report: 0.2)
    workers: int = 2  # DataLoader worker processes
    seed: int = 0
    distill: DistillConfig = field(default_factory=DistillConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **overrides) -> "Profile":
        unknown = set(overrides) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown profile fields {sorted(unknown)}; valid: {sorted(self.__dataclass_fields__)}")
        return replace(self, **overrides)


# Sized for the whole ./run_all.sh in at most 10 minutes on 2 CPU cores, models from scratch.
# DeepLab runs at output stride 32 with slim ASPP/decoder (128, student 64 channels): on a CPU
# the dilated stride-16 ResNet-18 costs twice as much per image for little gain at this size.
DEMO = Profile(
    name="demo",
    image_size=(160, 288),
    segformer=ModelPlan("segformer-b0", epochs=5, batch_size=8, lr=1e-3),
    deeplab=ModelPlan("deeplabv3plus-resnet18", {"output_stride": 32, "aspp_channels": 128, "decoder_channels": 128},
                      epochs=4, batch_size=8, lr=1e-3),
    # The demo student starts from the DeepLab teacher (same architecture, 13.5M parameters against
    # the ensemble's 17.2M) and distils the ensemble into it for 3 epochs: on 2 CPU cores a student
    # from scratch cannot catch up with the ensemble within the time budget.
    student=ModelPlan("deeplabv3plus-resnet18", {"output_stride": 32, "aspp_channels": 128, "decoder_channels": 128},
                      epochs=3, batch_size=8, lr=3e-4, init_from="deeplab"),
    patience=0,
    workers=0,
)

FULL = Profile(
    name="full",
    image_size=(512, 512),
    segformer=ModelPlan("segformer-b2", {"drop_path": 0.2}, pretrained="nvidia/mit-b2", epochs=20, batch_size=16, lr=6e-5),
    deeplab=ModelPlan("deeplabv3plus-resnet101", pretrained="IMAGENET1K_V2", epochs=20, batch_size=16, lr=1e-4),
    student=ModelPlan("segformer-b1", {"drop_path": 0.1}, pretrained="nvidia/mit-b1", epochs=20, batch_size=16, lr=6e-5),
    patience=5,
    prune_decoder=0.2,
    workers=8,
)

# Every profile, by the name --profile and the notebooks' `profile` parameter take: listed here only.
PROFILES = {"demo": DEMO, "full": FULL}


def with_settings(config, **settings):
    """`config` (a ModelPlan, DistillConfig or AdaptConfig) with the settings that are not None: a
    notebook parameter left at None keeps the profile's value. Unknown names are a ValueError."""
    given = {name: value for name, value in settings.items() if value is not None}
    unknown = set(given) - set(config.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)} for {type(config).__name__}; "
                         f"valid: {sorted(config.__dataclass_fields__)}")
    return replace(config, **given)


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}") from None
