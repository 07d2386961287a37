"""Knowledge distillation of an ensemble of teachers into one student model.

    teachers = Ensemble([segformer, deeplab], weights=[w, 1 - w])        # frozen
    model = DistillationStudent(build_model("segformer-b0"), teachers)   # student + 1x1 projections
    distiller = Distiller(teachers, DistillationLoss(alpha=0.5, temperature=2.0, beta=0.5))
    engine.fit(model, train_set, val_set, config, out_dir, step_loss=distiller)
    student = checkpoints.load_model(out_dir / "best.pt")                # the student alone

The loss, per batch:

    L = alpha * CE(student, ground truth)
        + (1 - alpha) * T^2 * KL(ensemble_T || student_T)
        + beta * feature matching

- CE is any hard-label loss (`hard_loss`, default cross-entropy); ignore
  pixels (255) are skipped.
- ensemble_T = sum_i w_i softmax(z_i / T) (`Ensemble.probs`), student_T =
  softmax(z_s / T). The KL is summed over classes and averaged over the valid
  (non-ignore) pixels; T^2 keeps its gradient on the scale of the CE's
  (Hinton et al., 2015).
- Unlabelled images (domain adaptation, notebook 05's `adapt`): a sample whose mask is all
  ignore is an image without labels. The hard term skips it like any ignored pixel (a batch
  of unlabelled images only has a hard term of 0, not NaN); with `confidence_threshold` set,
  its pixels join the soft term where the ensemble is confident (its max class probability
  at T = 1 at least the threshold, `soft_weights`), so the student learns the new desert from
  the teachers' soft labels where they are likely right (`adaptation.choose_threshold` picks the
  threshold from how often the ensemble is right on labelled val images at each confidence).
  Without a threshold (the default) unlabelled pixels count nowhere.
- Feature matching (see `FeatureProjections`): for each teacher and each
  matched layer (default: the deepest encoder stage and the decoder's fused
  map, `features[-2:]` in `offroadseg.models`), the student's map is projected
  by a trainable 1x1 conv onto the teacher's channels, both maps are shrunk
  to a common size (the coarser of the two, at most stride 8) and
  standardised per pixel over channels, and the MSE is taken; teachers are
  weighted by their ensemble weights.

The teachers run online, inside `step_loss`, under the student's autocast: training augments
every batch afresh (crops, rotations, flips, jitter), so cached soft labels would have to be
stored per augmented sample. `cost_split` measures what the teachers cost against the student's
step, which is what caching could save.

`DistillationStudent` is the module given to `engine.fit`: it holds the student
and the projections (so the optimizer and DDP see both), validates as the
student, and its `spec` carries `prefix="student."`, so `checkpoints.load_model` of
its checkpoint rebuilds the student alone.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .benchmark import time_fn
from .classes import IGNORE_INDEX
from .device import inference_autocast
from .ensemble import Ensemble
from .losses import CrossEntropyLoss
from .profiles import DistillConfig

# Which of the models' five feature maps are matched: the deepest encoder stage (what the
# encoder understood) and the decoder's fused map (what the classifier reads).
DEFAULT_LAYERS = (-2, -1)


def _standardise(features: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per pixel, zero mean and unit variance over channels (layer norm without affine), fp32."""
    features = features.float()
    mean = features.mean(dim=1, keepdim=True)
    variance = features.var(dim=1, keepdim=True, unbiased=False)
    return (features - mean) * torch.rsqrt(variance + eps)


class FeatureProjections(nn.Module):
    """Trainable 1x1 convs from student feature maps onto teacher feature maps, and their matching loss.

    `convs[t][k]` maps the student's map `layers[k]` (its channels) onto teacher
    t's map `layers[k]` (that teacher's channels). The loss of one pair:

    1. both maps are shrunk by area averaging (`adaptive_avg_pool2d`) to a
       common size: per dimension the smallest of the two maps' sizes and,
       when the input size is given, input / `min_stride` (rounded up). So no
       map is compared at a resolution it does not have (the student's
       stride-32 stage against a DeepLabV3+ stride-16 stage meets at stride
       32), and the stride-4 fused maps meet at stride 8 by default: a quarter
       of the cost (at stride 4 the matching took ~40% of a SegFormer-B0
       student's CPU step), while the pixel-level detail is the KL term's job
       at full resolution. Area averaging rather than bilinear sampling, since
       every resize here shrinks and sampling would alias. The student map is
       shrunk before projecting: a 1x1 conv and an averaging commute, and the
       smaller map is cheaper to project;
    2. both are standardised per pixel over channels (zero mean, unit variance,
       no affine). Teachers' features differ in scale by orders of magnitude
       between families and layers; after standardising, the MSE of a pixel
       is 2 (1 - Pearson correlation) of the two channel vectors, in [0, 4]
       for every layer and teacher, so no pair dominates by scale alone;
    3. the MSE over all elements.

    The pairs' losses are averaged over layers and weighted over teachers by
    `teacher_weights` (the ensemble's; they sum to 1).
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[Sequence[int]],
        layers: Sequence[int] = DEFAULT_LAYERS,
        teacher_weights: Sequence[float] | None = None,
        min_stride: int = 8,
    ):
        super().__init__()
        self.layers = tuple(int(layer) for layer in layers)
        self.min_stride = int(min_stride)
        count = len(teacher_channels)
        weights = [1.0] * count if teacher_weights is None else [float(w) for w in teacher_weights]
        if len(weights) != count:
            raise ValueError(f"{len(weights)} teacher weights for {count} teachers")
        self.teacher_weights = [w / sum(weights) for w in weights]
        self.convs = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(student_channels[layer], channels[layer], kernel_size=1) for layer in self.layers)
            for channels in teacher_channels
        )

    def forward(self, student_features: Sequence[torch.Tensor], teacher_features: Sequence[Sequence[torch.Tensor]],
                input_size: Sequence[int] | None = None) -> torch.Tensor:
        """Feature-matching loss (fp32 scalar); `teacher_features[t]` is teacher t's list of five maps
        (only those of `layers` are read: the others may be None, see `Distiller.teacher_outputs`).

        `input_size` (H, W) of the images enables the `min_stride` cap on the compared size.
        """
        if len(teacher_features) != len(self.convs):
            raise ValueError(f"features of {len(teacher_features)} teachers for projections onto {len(self.convs)}")
        cap = [math.ceil(side / self.min_stride) for side in input_size] if input_size is not None else None
        total = student_features[0].new_zeros((), dtype=torch.float32)
        shrunk = {}  # (layer, size) -> the student's map at that size, shared by the teachers
        for weight, convs, features in zip(self.teacher_weights, self.convs, teacher_features):
            pair_losses = []
            for layer, conv in zip(self.layers, convs):
                student, teacher = student_features[layer], features[layer]
                size = [min(a, b) for a, b in zip(student.shape[-2:], teacher.shape[-2:])]
                if cap is not None:
                    size = [min(side, limit) for side, limit in zip(size, cap)]
                key = (layer, *size)
                if key not in shrunk:
                    shrunk[key] = _shrink(student, size)
                pair_losses.append(F.mse_loss(_standardise(conv(shrunk[key])), _standardise(_shrink(teacher, size))))
            total = total + weight * torch.stack(pair_losses).mean()
        return total


def _shrink(features: torch.Tensor, size) -> torch.Tensor:
    return features if list(features.shape[-2:]) == list(size) else F.adaptive_avg_pool2d(features, size)


class DistillationStudent(nn.Module):
    """The module trained by distillation: `.student` (a `build_model` model) and `.projections`.

    `forward(x)` is the student's (logits, or `(logits, features)` with
    `return_features=True`), so `engine.fit` validates the student itself.
    `forward(x, teacher_features=...)` returns `(logits, feature_loss)`: the
    projections run inside the forward, so under DDP their gradients are
    synchronised like the student's.

    `.decoder` is the student's decoder (decoder pruning prunes the student),
    and `.spec` is the student's spec plus `"prefix": "student."`:
    `checkpoints.load_model` of a checkpoint of this module rebuilds the student
    alone from the keys under that prefix (the projections are dropped).

    `teachers` (an Ensemble or a list of models) is read for its members'
    `feature_channels` and its weights only; the teachers are not held here, so
    they stay out of the optimizer and the checkpoints. `layers` and
    `min_stride` are `FeatureProjections`'; `layers=()` builds no projections
    (for a loss without feature matching).
    """

    def __init__(self, student: nn.Module, teachers: Ensemble | Sequence[nn.Module],
                 layers: Sequence[int] = DEFAULT_LAYERS, min_stride: int = 8):
        super().__init__()
        members, weights = _members_and_weights(teachers)
        self.student = student
        self.projections = FeatureProjections(
            student.feature_channels, [m.feature_channels for m in members], layers, weights, min_stride
        )
        spec = getattr(student, "spec", None)
        self.spec = {**spec, "prefix": "student."} if spec is not None else None

    @property
    def decoder(self) -> nn.Module:
        # A property, not an attribute: assigning the submodule would register it a second
        # time and put every decoder weight twice into the state_dict.
        return self.student.decoder

    @property
    def encoder(self) -> nn.Module:
        return self.student.encoder

    @property
    def matches_features(self) -> bool:
        """Whether there are projections, i.e. the forward wants teacher features."""
        return len(self.projections.layers) > 0

    def forward(self, x: torch.Tensor, teacher_features: Sequence[Sequence[torch.Tensor]] | None = None,
                return_features: bool = False):
        if teacher_features is None:
            return self.student(x, return_features=return_features)
        logits, features = self.student(x, return_features=True)
        return logits, self.projections(features, teacher_features, input_size=x.shape[-2:])


def _members_and_weights(teachers) -> tuple[list[nn.Module], list[float]]:
    if isinstance(teachers, Ensemble):
        return list(teachers.members), list(teachers.weights)
    members = list(teachers)
    return members, [1.0 / len(members)] * len(members)


def _matched_layers(model: nn.Module) -> tuple[int, ...]:
    """The feature layers a (possibly wrapped) DistillationStudent's projections match; () for other models."""
    projections = getattr(_unwrap(model), "projections", None)
    return tuple(projections.layers) if isinstance(projections, FeatureProjections) else ()


def _unwrap(model: nn.Module) -> nn.Module:
    # engine.fit hands step_loss the prepared model: possibly DDP (.module) or compiled (._orig_mod).
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class DistillationLoss(nn.Module):
    """alpha * hard loss + (1 - alpha) * T^2 * KL(teacher_T || student_T) + beta * feature loss.

    `parts(student_logits, masks, teacher_probs, feature_loss)` returns each
    term ("hard", "soft", "feature") and the weighted "total"; `forward`
    returns the total. `teacher_probs` are the ensemble's probabilities at
    `temperature` (N, C, H, W); `feature_loss` the projections' scalar (None
    counts as 0). The hard loss defaults to cross-entropy with the ignore
    index; pass e.g. a class-weighted `SegmentationLoss` instead. All terms in
    fp32. An all-ignored batch has a soft term of 0.

    `confidence_threshold` (None: off) lets unlabelled images (all-ignore masks) into the soft
    term where the teachers' `confidence` (their max class probability at T = 1, (N, H, W)) is at
    least the threshold; see `soft_weights`.
    """

    def __init__(self, alpha: float = DistillConfig.alpha, temperature: float = DistillConfig.temperature,
                 beta: float = DistillConfig.beta,
                 hard_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 ignore_index: int = IGNORE_INDEX, confidence_threshold: float | None = None):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        if confidence_threshold is not None and not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1] (a probability) or None, got {confidence_threshold}")
        self.alpha, self.temperature, self.beta = float(alpha), float(temperature), float(beta)
        self.ignore_index = ignore_index
        self.confidence_threshold = None if confidence_threshold is None else float(confidence_threshold)
        self.hard_loss = hard_loss if hard_loss is not None else CrossEntropyLoss(ignore_index=ignore_index)

    def soft_loss(self, student_logits: torch.Tensor, masks: torch.Tensor, teacher_probs: torch.Tensor,
                  confidence: torch.Tensor | None = None) -> torch.Tensor:
        """T^2 * KL(teacher_T || student_T), summed over classes, averaged over the pixels `soft_weights` keeps."""
        log_student = (student_logits.float() / self.temperature).log_softmax(dim=1)
        teacher_probs = teacher_probs.float()
        # xlogy: 0 * log 0 = 0 where a teacher gives a class zero probability.
        kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student).sum(dim=1)
        weights = soft_weights(masks, confidence, self.confidence_threshold, self.ignore_index).to(kl.dtype)
        return self.temperature**2 * (kl * weights).sum() / weights.sum().clamp_min(1.0)

    def parts(self, student_logits, masks, teacher_probs, feature_loss=None,
              confidence=None) -> dict[str, torch.Tensor]:
        hard = self.hard_loss(student_logits, masks)
        soft = self.soft_loss(student_logits, masks, teacher_probs, confidence)
        feature = feature_loss.float() if feature_loss is not None else hard.new_zeros(())
        total = self.alpha * hard + (1.0 - self.alpha) * soft + self.beta * feature
        return {"hard": hard, "soft": soft, "feature": feature, "total": total}

    def forward(self, student_logits, masks, teacher_probs, feature_loss=None, confidence=None) -> torch.Tensor:
        return self.parts(student_logits, masks, teacher_probs, feature_loss, confidence)["total"]


def unlabelled_samples(masks: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Bool (N,): the samples whose mask is all ignore, i.e. images without labels (`SegmentationDataset`
    gives a pair without a mask an all-ignore mask)."""
    return (masks == ignore_index).flatten(1).all(dim=1)


def soft_weights(masks: torch.Tensor, confidence: torch.Tensor | None, threshold: float | None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Float (N, H, W): which pixels the soft term averages over.

    Labelled images: their valid (non-ignore) pixels, as always; their ignore pixels stay out
    (a raw ID outside the class table is no pixel to learn anything about). Unlabelled images
    (all-ignore masks): with a `threshold`, the pixels where the teachers' `confidence` is at
    least the threshold; without one, none.
    """
    weights = (masks != ignore_index).float()
    if threshold is None:
        return weights
    if confidence is None:
        raise ValueError("a confidence threshold needs the teachers' confidence (Distiller.teacher_outputs "
                         "computes it when the loss has a confidence_threshold)")
    unlabelled = unlabelled_samples(masks, ignore_index)[:, None, None]
    return torch.where(unlabelled, (confidence >= threshold).float(), weights)


class TeacherOutputs(NamedTuple):
    """What the frozen teachers give one batch: ensemble probabilities at T, each teacher's features,
    and (for a loss with a confidence threshold) the ensemble's confidence.

    `features[t]` is teacher t's list of five maps with None in place of the maps no projection
    matches: kept in position so `FeatureProjections` indexes it as the model's full list.
    `confidence` (N, H, W): the ensemble's max class probability at T = 1, or None.
    """

    probs: torch.Tensor
    features: list[list[torch.Tensor]] | None
    confidence: torch.Tensor | None = None


class Distiller:
    """The `step_loss` of distillation for `engine.fit`: frozen teachers run online, then the loss.

        engine.fit(DistillationStudent(student, teachers), ..., step_loss=Distiller(teachers, loss))

    `step_loss(model, images, masks)` (also `distiller(model, images, masks)`)
    runs the teachers without gradients under the caller's autocast, then the
    student (with its projections when it has any) and returns the scalar
    `DistillationLoss`. The teachers are moved to the images' device on first
    use. The feature term is computed whenever the student has projections,
    even with beta = 0 (it then adds nothing), because DDP expects every
    trainable parameter to take part in each step.
    """

    def __init__(self, teachers: Ensemble | Sequence[nn.Module], loss: DistillationLoss | None = None):
        self.teachers = teachers if isinstance(teachers, Ensemble) else Ensemble(list(teachers))
        self.teachers.requires_grad_(False).eval()
        self.loss = loss if loss is not None else DistillationLoss()
        self._device = None

    def _to(self, device: torch.device) -> None:
        if self._device != device:
            self.teachers.to(device)
            self._device = device

    @torch.no_grad()
    def teacher_outputs(self, images: torch.Tensor, with_features: bool = True,
                        layers: Sequence[int] = DEFAULT_LAYERS) -> TeacherOutputs:
        """The teachers' soft labels at the loss's temperature, (optionally) their feature maps, and
        their confidence when the loss has a confidence threshold.

        Only the maps of `layers` are kept (the others are None): they are held until the
        student's step ends, and all five maps of both teachers are about 0.7 GB more at
        batch 16 for nothing.
        """
        # no_grad, not inference_mode: inference tensors may not be saved for the student's backward.
        self._to(images.device)
        with_confidence = self.loss.confidence_threshold is not None
        if not with_features and not with_confidence:
            return TeacherOutputs(self.teachers.probs(images, self.loss.temperature), None)
        logits, features = [], []
        for member in self.teachers.members:
            if not with_features:
                logits.append(member(images))
                continue
            member_logits, maps = member(images, return_features=True)
            keep = {layer % len(maps) for layer in layers}
            logits.append(member_logits)
            features.append([feature if index in keep else None for index, feature in enumerate(maps)])
            del maps  # the unused maps are freed before the next teacher runs
        confidence = self.teachers.average(logits).amax(dim=1) if with_confidence else None
        return TeacherOutputs(self.teachers.average(logits, self.loss.temperature), features if with_features else None,
                              confidence)

    def parts(self, model: nn.Module, images: torch.Tensor, masks: torch.Tensor,
              teacher: TeacherOutputs | None = None) -> dict[str, torch.Tensor]:
        """The loss's terms for one batch (teachers run unless their outputs are given)."""
        matches = getattr(_unwrap(model), "matches_features", False)
        if self.loss.beta > 0 and not matches:
            raise ValueError("the loss has a feature term (beta > 0) but the model has no feature projections; "
                             "train a DistillationStudent built with layers, or set beta=0")
        if teacher is None:
            teacher = self.teacher_outputs(images, with_features=matches, layers=_matched_layers(model))
        if matches:
            logits, feature_loss = model(images, teacher_features=teacher.features)
        else:
            logits, feature_loss = model(images), None
        return self.loss.parts(logits, masks, teacher.probs, feature_loss, teacher.confidence)

    def step_loss(self, model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.parts(model, images, masks)["total"]

    __call__ = step_loss


def cost_split(distiller: Distiller, model: nn.Module, images: torch.Tensor, masks: torch.Tensor,
               warmup: int = 1, runs: int = 3) -> dict:
    """Milliseconds per batch of the teachers' forwards vs the student's forward + loss + backward.

    What caching soft labels could save at most is `teachers_ms` (the student
    step remains); `teacher_share` = teachers / (teachers + student). Runs
    on the images' device, under the same autocast as training would
    (`device.inference_autocast` rule), in training mode for the student;
    afterwards its gradients are cleared and its buffers (BatchNorm
    statistics) and mode restored, so measuring does not change the model.
    """
    device = images.device
    masks = masks.to(device)
    model.to(device)
    was_training = model.training
    saved_buffers = [buffer.detach().clone() for buffer in model.buffers()]
    model.train()
    matches = getattr(_unwrap(model), "matches_features", False)
    layers = _matched_layers(model)
    with inference_autocast(device):
        teacher = distiller.teacher_outputs(images, with_features=matches, layers=layers)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def teachers():
        with inference_autocast(device):
            distiller.teacher_outputs(images, with_features=matches, layers=layers)

    def student():
        with inference_autocast(device):
            loss = distiller.parts(model, images, masks, teacher)["total"]
        loss.backward()

    teacher_timing = time_fn(teachers, warmup=warmup, runs=runs, device=device)
    student_timing = time_fn(student, warmup=warmup, runs=runs, device=device)
    for p in trainable:
        p.grad = None
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), saved_buffers):
            buffer.copy_(saved)
    model.train(was_training)
    teachers_ms, student_ms = teacher_timing["median_ms"], student_timing["median_ms"]
    return {"teachers_ms": teachers_ms, "student_ms": student_ms,
            "teacher_share": teachers_ms / (teachers_ms + student_ms), "batch": len(images),
            "input_size": list(images.shape[-2:]), "device": str(device)}
