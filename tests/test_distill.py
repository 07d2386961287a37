"""Distillation: the loss's terms, feature matching, frozen teachers, training through the engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from offroadseg.checkpoints import load_checkpoint, load_model
from offroadseg.distill import (
    DistillationLoss,
    DistillationStudent,
    Distiller,
    FeatureProjections,
    cost_split,
    soft_weights,
)
from offroadseg.engine import TrainConfig, fit
from offroadseg.ensemble import Ensemble
from offroadseg.models import build_model

H, W = 32, 48


# Tiny tensors: one torch thread (the shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_teachers() -> Ensemble:
    torch.manual_seed(0)
    segformer = build_model("segformer-b0", decoder_hidden_size=32)
    deeplab = build_model("deeplabv3plus-resnet18", aspp_channels=16, decoder_channels=16, low_level_channels=8)
    return Ensemble([segformer, deeplab], weights=[0.6, 0.4])


def tiny_student():
    torch.manual_seed(1)
    return build_model("segformer-b0", decoder_hidden_size=16)


def batch(n: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, H, W, generator=generator)
    masks = torch.randint(0, 10, (n, H, W), generator=generator)
    masks[:, :4, :6] = 255
    return images, masks


# --------------------------------------------------------------------------------- loss


def test_alpha_one_beta_zero_is_cross_entropy():
    logits, teacher = torch.randn(2, 10, 8, 12), torch.randn(2, 10, 8, 12).softmax(1)
    masks = torch.randint(0, 10, (2, 8, 12))
    masks[0, :3] = 255
    loss = DistillationLoss(alpha=1.0, temperature=3.0, beta=0.0)
    total = loss(logits, masks, teacher, feature_loss=torch.tensor(5.0))
    assert total.item() == pytest.approx(F.cross_entropy(logits, masks, ignore_index=255).item(), rel=1e-6)


def test_soft_term_vanishes_when_the_student_matches_the_ensemble_at_temperature():
    teachers, (images, masks) = tiny_teachers(), batch()
    temperature = 3.0
    loss = DistillationLoss(alpha=0.0, temperature=temperature, beta=0.0)
    with torch.no_grad():
        ensemble_t = teachers.probs(images, temperature)
    # softmax(z / T) = ensemble_T  <=>  z = T * log(ensemble_T) (+ a per-pixel constant)
    matching = temperature * ensemble_t.log()
    assert loss.soft_loss(matching, masks, ensemble_t).item() == pytest.approx(0.0, abs=1e-5)
    other = matching + torch.randn_like(matching)
    assert loss.soft_loss(other, masks, ensemble_t).item() > 1e-2


def test_ignored_pixels_change_nothing():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 10, 8, 12, generator=generator)
    teacher = torch.randn(2, 10, 8, 12, generator=generator).softmax(1)
    masks = torch.randint(0, 10, (2, 8, 12), generator=generator)
    masks[:, :, :5] = 255
    ignored = (masks == 255).unsqueeze(1)
    loss = DistillationLoss(alpha=0.3, temperature=2.0, beta=0.0)
    parts = loss.parts(logits, masks, teacher)
    other_logits = torch.where(ignored, 100 * torch.randn_like(logits), logits)
    other_teacher = torch.where(ignored, torch.randn_like(teacher).softmax(1), teacher)
    again = loss.parts(other_logits, masks, other_teacher)
    for name in ("hard", "soft", "total"):
        assert again[name].item() == pytest.approx(parts[name].item(), rel=1e-6), name
    # An all-ignored batch has no soft term (0, not NaN).
    assert loss.soft_loss(logits, torch.full_like(masks, 255), teacher).item() == 0.0


# ------------------------------------------------------------ unlabelled images (adaptation)


def test_soft_weights_keep_labelled_pixels_and_only_confident_pixels_of_unlabelled_images():
    masks = torch.tensor([[[0, 255], [3, 4]], [[255, 255], [255, 255]]])  # a labelled image, an unlabelled one
    confidence = torch.tensor([[[0.9, 0.9], [0.1, 0.1]], [[0.95, 0.5], [0.8, 0.7]]])
    expected = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    assert torch.equal(soft_weights(masks, confidence, 0.8), expected)
    # Without a threshold unlabelled pixels count nowhere (the behaviour without adaptation).
    assert torch.equal(soft_weights(masks, None, None), (masks != 255).float())
    with pytest.raises(ValueError, match="confidence"):
        soft_weights(masks, None, 0.8)


def test_a_batch_of_unlabelled_images_trains_only_the_soft_term_and_gives_a_finite_loss():
    teachers, (images, _) = tiny_teachers(), batch()
    unlabelled = torch.full((2, H, W), 255)
    student = tiny_student()
    model = DistillationStudent(student, teachers, layers=())
    threshold = 0.0  # every pixel is confident enough: the soft term must be there
    parts = Distiller(teachers, DistillationLoss(alpha=0.5, beta=0.0, confidence_threshold=threshold)).parts(
        model, images, unlabelled)
    assert all(torch.isfinite(v) for v in parts.values())
    assert parts["hard"].item() == 0.0 and parts["soft"].item() > 0
    assert parts["total"].item() == pytest.approx(0.5 * parts["soft"].item(), rel=1e-6)
    parts["total"].backward()
    assert student.decoder.classifier.weight.grad.abs().sum() > 0
    # The same batch without a threshold: nothing to learn from, a loss of 0 (not NaN, which skips the step).
    plain = Distiller(teachers, DistillationLoss(alpha=0.5, beta=0.0)).parts(model, images, unlabelled)
    assert plain["total"].item() == 0.0
    # A threshold no pixel reaches keeps them all out again.
    none_kept = Distiller(teachers, DistillationLoss(alpha=0.5, beta=0.0, confidence_threshold=1.0)).parts(
        model, images, unlabelled)
    assert none_kept["soft"].item() == 0.0


def test_labelled_images_give_the_same_loss_with_or_without_a_threshold():
    teachers, (images, masks) = tiny_teachers(), batch()
    model = DistillationStudent(tiny_student(), teachers, layers=()).eval()
    with_rule = Distiller(teachers, DistillationLoss(beta=0.0, confidence_threshold=0.7)).parts(model, images, masks)
    without = Distiller(teachers, DistillationLoss(beta=0.0)).parts(model, images, masks)
    for name in ("hard", "soft", "total"):
        assert with_rule[name].item() == pytest.approx(without[name].item(), rel=1e-6), name


def test_feature_term_is_scale_free_and_decreases_when_the_projections_learn():
    torch.manual_seed(0)
    # Student maps (8 and 6 channels); the teacher's are a fixed linear map of them, at other
    # sizes and a scale 1000 times larger: the projections can learn to match them exactly.
    student = [torch.randn(2, 8, 4, 6), torch.randn(2, 6, 8, 12)]
    maps = [torch.randn(16, 8), torch.randn(12, 6)]
    teacher = [
        1000 * torch.einsum("oc,nchw->nohw", maps[0], F.interpolate(student[0], size=(8, 12), mode="bilinear")),
        torch.einsum("oc,nchw->nohw", maps[1], student[1]),
    ]
    projections = FeatureProjections([8, 6], [[16, 12]], layers=(0, 1))
    start = projections(student, [teacher]).item()
    scaled = projections(student, [[teacher[0] / 1000, teacher[1] * 7]]).item()
    assert scaled == pytest.approx(start, rel=1e-4)  # standardised: the teachers' scale does not matter
    optimizer = torch.optim.Adam(projections.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        loss = projections(student, [teacher])
        loss.backward()
        optimizer.step()
    assert 0.5 < start < 4.0
    assert loss.item() < 0.2 * start


# ---------------------------------------------------------------------- student + engine


def test_step_loss_trains_student_and_projections_never_the_teachers():
    teachers, (images, masks) = tiny_teachers(), batch()
    model = DistillationStudent(tiny_student(), teachers)
    assert len(model.projections.convs) == 2 and all(len(convs) == 2 for convs in model.projections.convs)
    distiller = Distiller(teachers, DistillationLoss(alpha=0.5, temperature=2.0, beta=1.0))
    parts = distiller.parts(model, images, masks)
    assert all(torch.isfinite(v) for v in parts.values())
    assert parts["soft"] > 0 and parts["feature"] > 0
    parts["total"].backward()
    assert all(p.grad is None for p in teachers.parameters())
    assert not any(p.requires_grad for p in teachers.parameters())
    assert all(p.grad is not None for p in model.projections.parameters())
    assert model.student.decoder.classifier.weight.grad.abs().sum() > 0
    # Training does not wake the teachers up.
    model.train()
    assert not any(m.training for m in teachers.members)


def test_the_step_keeps_only_the_teacher_maps_the_projections_match(monkeypatch):
    # All five maps of both teachers were held through the student's step (~0.7 GB at batch 16).
    teachers, (images, masks) = tiny_teachers(), batch()
    model = DistillationStudent(tiny_student(), teachers, layers=(-2, -1)).eval()  # no dropout: comparable losses
    distiller = Distiller(teachers, DistillationLoss(beta=1.0))
    seen = []
    real_forward = model.projections.forward
    monkeypatch.setattr(model.projections, "forward", lambda student, teacher_features, input_size=None: (
        seen.append(teacher_features) or real_forward(student, teacher_features, input_size)))
    loss = distiller.step_loss(model, images, masks)
    assert len(seen) == 1 and len(seen[0]) == 2  # one list per teacher
    for member, maps in zip(teachers.members, seen[0]):
        assert len(maps) == 5 and [i for i, m in enumerate(maps) if m is not None] == [3, 4]
        with torch.no_grad():
            full = member(images, return_features=True)[1]
        assert all(torch.equal(maps[i], full[i]) for i in (3, 4))
    # The same loss as from the full lists.
    with torch.no_grad():
        full_lists = [member(images, return_features=True)[1] for member in teachers.members]
        logits, feature_loss = model(images, teacher_features=full_lists)
        expected = distiller.loss(logits, masks, teachers.probs(images, distiller.loss.temperature), feature_loss)
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
    only_last = distiller.teacher_outputs(images, layers=(0,))
    assert [[m is not None for m in maps] for maps in only_last.features] == [[True, False, False, False, False]] * 2


def test_a_feature_term_needs_projections():
    teachers, (images, masks) = tiny_teachers(), batch()
    plain = DistillationStudent(tiny_student(), teachers, layers=())
    with pytest.raises(ValueError, match="projections"):
        Distiller(teachers, DistillationLoss(beta=1.0)).step_loss(plain, images, masks)
    loss = Distiller(teachers, DistillationLoss(beta=0.0)).step_loss(plain, images, masks)
    assert torch.isfinite(loss)


def test_decoder_is_the_students_and_appears_once_in_the_state_dict():
    model = DistillationStudent(tiny_student(), tiny_teachers())
    assert model.decoder is model.student.decoder
    keys = list(model.state_dict())
    assert all(k.startswith(("student.", "projections.")) for k in keys)
    assert model.spec == {**model.student.spec, "prefix": "student."}


class RandomScenes(Dataset):
    def __init__(self, n: int, seed: int):
        self.images, self.masks = batch(n, seed)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.masks[index]


@pytest.mark.slow
def test_fit_with_the_distiller_and_load_model_returns_the_student(tmp_path):
    teachers = tiny_teachers()
    model = DistillationStudent(tiny_student(), teachers)
    config = TrainConfig(epochs=2, batch_size=4, lr=1e-3, warmup_epochs=0.5, precision="fp32", seed=0)
    history = fit(model, RandomScenes(8, seed=1), RandomScenes(4, seed=2), config, tmp_path,
                  step_loss=Distiller(teachers, DistillationLoss(beta=0.5)), progress=False)
    assert len(history) == 2 and all(row["skipped_steps"] == 0 for row in history)

    checkpoint = load_checkpoint(tmp_path / "best.pt")
    assert any(k.startswith("projections.") for k in checkpoint["model"])  # the wrapper's whole state was saved
    student = load_model(tmp_path / "best.pt")
    assert type(student) is type(model.student) and not student.training
    expected = {k[len("student."):]: v for k, v in checkpoint["model"].items() if k.startswith("student.")}
    assert student.state_dict().keys() == expected.keys()
    assert all(torch.equal(student.state_dict()[k], v) for k, v in expected.items())
    # And it predicts as the trained wrapper did at its best epoch.
    model.load_state_dict(checkpoint["model"])
    images = batch(2, seed=5)[0]
    with torch.no_grad():
        assert torch.allclose(student(images), model.eval()(images), atol=1e-6)


def test_cost_split_reports_both_parts_and_leaves_the_model_as_it_was():
    teachers, (images, masks) = tiny_teachers(), batch()
    model = DistillationStudent(tiny_student(), teachers).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    split = cost_split(Distiller(teachers), model, images, masks, warmup=0, runs=1)
    assert split["teachers_ms"] > 0 and split["student_ms"] > 0 and 0 < split["teacher_share"] < 1
    assert split["batch"] == 2 and split["input_size"] == [H, W]
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
