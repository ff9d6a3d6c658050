"""Loss terms, the DenseCRF loss against a brute-force dense Gaussian, its filter started early in
worker processes (and a killed one), and compute_afa_losses."""

import logging
import os
import signal
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import afa.losses
from afa.affinity import affinity_label
from afa.cam import box_mask
from afa.losses import (DenseCRFLoss, affinity_loss, balanced_seg_loss, bilateral_filter,
                        classification_loss)
from afa.models.par import PAR
from afa.pseudo_labels import compute_afa_losses
from conftest import smooth

needs_pydensecrf = pytest.mark.skipif(afa.losses.dcrf is None, reason="pydensecrf2 is absent")


def test_classification_loss_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    expected = -(F.logsigmoid(logits) * labels + F.logsigmoid(-logits) * (1 - labels)).mean()
    torch.testing.assert_close(classification_loss(logits, labels), expected)


def test_affinity_loss_perfect_prediction_is_zero():
    torch.manual_seed(0)
    target = torch.randint(0, 2, (2, 9, 9))
    target[:, 0, :] = 255
    pred = torch.where(target == 255, torch.rand(2, 9, 9), target.float())
    assert affinity_loss(pred, target) == 0
    # Uniform 0.5 prediction: each half contributes 0.5 * 0.5 * n / (n + 1).
    n_pos, n_neg = int((target == 1).sum()), int((target == 0).sum())
    expected = 0.25 * n_pos / (n_pos + 1) + 0.25 * n_neg / (n_neg + 1)
    assert affinity_loss(torch.full((2, 9, 9), 0.5), target) == pytest.approx(expected)


def test_balanced_seg_loss_is_mean_of_partial_ces():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 4, 4)
    target = torch.randint(0, 4, (2, 8, 8))
    target[0, :2] = 255
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    ce = -up.log_softmax(dim=1).gather(1, target.clamp(max=3)[:, None])[:, 0]  # (2, 8, 8)
    bkg, fg = target == 0, (target > 0) & (target != 255)
    expected = 0.5 * (ce[bkg].mean() + ce[fg].mean())
    torch.testing.assert_close(balanced_seg_loss(logits, target), expected)

    only_bkg = torch.where(target == 255, target, torch.zeros_like(target))
    loss = balanced_seg_loss(logits, only_bkg)
    assert torch.isfinite(loss)
    ce_bkg = -up.log_softmax(dim=1)[:, 0]
    torch.testing.assert_close(loss, 0.5 * ce_bkg[only_bkg == 0].mean())


def _piecewise_image(h, w, seed):
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), np.float32)
    image[:, : w // 2] = (200, 40, 40)
    image[:, w // 2:] = (30, 90, 200)
    image[h // 2:, : w // 3] = (90, 200, 60)
    return (image + rng.normal(0, 6, image.shape)).clip(0, 255).astype(np.float32)


def _smooth_probs(k, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = F.avg_pool2d(torch.randn(1, k, h, w, generator=gen), 5, 1, 2) * 4
    return logits.softmax(dim=1)[0]  # (K, h, w)


def _dense_gaussian(image, sigma_rgb, sigma_xy):
    """The exact (N, N) bilateral kernel exp(-|f_i - f_j|^2 / 2), self included."""
    h, w, _ = image.shape
    ys, xs = np.mgrid[0:h, 0:w]
    feats = np.concatenate([np.stack([xs.ravel(), ys.ravel()]) / sigma_xy,
                            image.reshape(-1, 3).T / sigma_rgb]).astype(np.float64)
    dist2 = ((feats[:, :, None] - feats[:, None, :]) ** 2).sum(0)
    return np.exp(-0.5 * dist2)


@needs_pydensecrf
def test_bilateral_filter_matches_dense_gaussian_up_to_a_constant():
    image = _piecewise_image(16, 20, seed=0)
    probs = _smooth_probs(3, 16, 20, seed=0).reshape(3, -1).numpy()
    lattice = bilateral_filter(probs, image, sigma_rgb=15.0, sigma_xy=8.0)
    exact = probs.astype(np.float64) @ _dense_gaussian(image, 15.0, 8.0)  # W symmetric
    assert np.corrcoef(lattice.ravel(), exact.ravel())[0, 1] > 0.98
    energy_lattice, energy_exact = (probs * lattice).sum(0), (probs * exact).sum(0)
    assert np.corrcoef(energy_lattice, energy_exact)[0, 1] > 0.98
    # The lattice's Gaussian carries ~0.55 of the exact one's weight, a near-constant factor.
    assert 0.45 < lattice.sum() / exact.sum() < 0.65


def _brute_force_crf_loss(rgb, probs, label, boxes, sigma_rgb=15.0, sigma_xy=100.0):
    """docs/method.md, step 12 with a dense (N, N) Gaussian, energy_scale 1."""
    size = (rgb.shape[-2] // 2, rgb.shape[-1] // 2)
    image = F.interpolate(rgb * 255, size=size, mode="bilinear", align_corners=False)
    s = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    s = s * F.interpolate(box_mask(boxes, *rgb.shape[-2:])[:, None].float(), size=size)
    small_label = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0]
    gate = torch.where(small_label == 255, 1.0, 1 - s.amax(dim=1))
    energy = 0.0
    for b in range(rgb.shape[0]):
        kernel = _dense_gaussian(image[b].permute(1, 2, 0).numpy(), sigma_rgb, sigma_xy * 0.5)
        ws = s[b].flatten(1).double() @ torch.from_numpy(kernel)  # (K, N)
        energy -= float((s[b].flatten(1) * gate[b].flatten() * ws).sum())
    return energy / rgb.shape[0]


@needs_pydensecrf
def test_dense_crf_loss_equals_brute_force_up_to_a_constant_factor():
    crf = DenseCRFLoss(sigma_rgb=15.0, sigma_xy=10.0, energy_scale=1.0)
    rgb = torch.from_numpy(_piecewise_image(32, 36, seed=1)).permute(2, 0, 1)[None] / 255
    boxes = torch.tensor([[0, 32, 0, 30]])
    ratios = []
    for seed in range(4):
        probs = _smooth_probs(3, 32, 36, seed=seed)[None]
        label = probs.argmax(dim=1)
        label[:, 10:20] = 255
        lattice = float(crf(rgb, probs, label, boxes))
        exact = _brute_force_crf_loss(rgb, probs, label, boxes, sigma_xy=10.0)
        assert lattice < 0 and exact < 0
        ratios.append(lattice / exact)
    ratios = np.asarray(ratios)
    assert 0.45 < ratios.mean() < 0.65  # doubling sigma_xy moves this to ~0.73
    assert ratios.std() / ratios.mean() < 0.03


@needs_pydensecrf
def test_dense_crf_loss_gradient_by_finite_differences():
    """With every pixel unlabelled the gate is 1, and -2 W S / B is the gradient of E."""
    crf = DenseCRFLoss(sigma_rgb=15.0, sigma_xy=10.0, energy_scale=1.0)
    rgb = torch.from_numpy(_piecewise_image(32, 32, seed=2)).permute(2, 0, 1)[None] / 255
    rgb = rgb.repeat(2, 1, 1, 1)
    boxes = torch.tensor([[0, 32, 0, 32], [0, 32, 0, 24]])
    label = torch.full((2, 32, 32), 255)
    probs = torch.stack([_smooth_probs(3, 32, 32, seed=s) for s in (3, 4)]).requires_grad_()
    loss = crf(rgb, probs, label, boxes)
    (grad,) = torch.autograd.grad(loss, probs)
    inside = box_mask(boxes, 32, 32)[:, None].expand_as(grad)
    assert (grad[~inside] == 0).all()
    assert (grad[inside] < 0).all()  # more mass anywhere raises the (negative) similarity sum

    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        direction = torch.rand(probs.shape, generator=gen)
        eps = 0.05  # E is quadratic in S, so the central difference has no truncation error
        with torch.no_grad():
            plus = crf(rgb, probs + eps * direction, label, boxes)
            minus = crf(rgb, probs - eps * direction, label, boxes)
        numeric = float(plus - minus) / (2 * eps)
        analytic = float((grad * direction).sum())
        assert analytic == pytest.approx(numeric, rel=0.03)


def test_dense_crf_loss_requires_pydensecrf(monkeypatch):
    monkeypatch.setattr(afa.losses, "dcrf", None)
    with pytest.raises(ImportError, match="pip install pydensecrf2"):
        DenseCRFLoss()


def _combined_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, c, size = 2, 6, 32
    labels = torch.zeros(b, c - 1)
    labels[0, [1, 4]] = 1
    labels[1, 2] = 1
    blocks = torch.rand(b, c - 1, 4, 4, generator=gen)
    cam = F.interpolate(blocks, size=(size, size), mode="bilinear", align_corners=False)
    return dict(
        cls_logits=torch.randn(b, c - 1, generator=gen).requires_grad_(),
        seg_logits=torch.randn(b, c, size // 4, size // 4, generator=gen).requires_grad_(),
        aff_pred=torch.rand(b, 4, 4, generator=gen).requires_grad_(),  # 2x2 grid at stride 16
        cam=cam,
        cam_aff=torch.rand(b, 9, 9, generator=gen),  # 3x3 grid of the 1.5x scale
        grids=((2, 2), (3, 3)),
        rgb=torch.rand(b, 3, size, size, generator=gen),
        labels=labels,
        boxes=torch.tensor([[0, 32, 0, 32], [0, 28, 4, 32]]),
    )


@needs_pydensecrf
def test_compute_afa_losses_schedule():
    inputs = _combined_inputs()
    par = PAR(dilations=(1, 2), num_iter=3)
    crf = DenseCRFLoss(energy_scale=1e-4)
    kwargs = dict(par=par, crf_loss=crf, w_seg=0.1, w_aff=0.2, w_reg=0.5)

    warmup = compute_afa_losses(**inputs, joint=False, **kwargs)
    assert warmup.reg_loss == 0
    assert warmup.seg_loss > 0 and warmup.aff_loss > 0  # computed for logging ...
    torch.testing.assert_close(warmup.total, warmup.cls_loss)  # ... but not used
    grads = torch.autograd.grad(warmup.total, [inputs["seg_logits"], inputs["aff_pred"]])
    assert all((g == 0).all() for g in grads)  # reached with zero weight: DDP sees every param

    joint = compute_afa_losses(**inputs, joint=True, **kwargs)
    assert joint.reg_loss != 0
    torch.testing.assert_close(joint.total, joint.cls_loss + 0.1 * joint.seg_loss
                               + 0.2 * joint.aff_loss + 0.5 * joint.reg_loss)
    assert torch.equal(joint.seg_target, joint.refined_label)
    # The two pseudo labels differ here, so the switch below is observable.
    assert not torch.equal(joint.refined_label, joint.aff_pseudo_label)
    torch.testing.assert_close(joint.seg_loss,
                               balanced_seg_loss(inputs["seg_logits"], joint.refined_label))

    late = compute_afa_losses(**inputs, joint=True, affinity_target=True, **kwargs)
    assert torch.equal(late.seg_target, late.aff_pseudo_label)
    torch.testing.assert_close(late.seg_loss,
                               balanced_seg_loss(inputs["seg_logits"], late.aff_pseudo_label))
    # The affinity target always comes from the refined CAM label.
    assert torch.equal(late.aff_label, affinity_label(late.refined_label, (2, 2), radius=8))
    torch.testing.assert_close(late.aff_loss, affinity_loss(inputs["aff_pred"], late.aff_label))


def test_compute_afa_losses_labels_respect_box_and_classes():
    inputs = _combined_inputs(seed=1)
    out = compute_afa_losses(**inputs, joint=False, par=PAR(dilations=(1, 2), num_iter=2))
    outside = ~box_mask(inputs["boxes"], 32, 32)
    for name in ("cam_label", "refined_label", "aff_pseudo_label", "seg_target"):
        label = getattr(out, name)
        assert label.shape == (2, 32, 32) and label.dtype == torch.long
        assert (label[outside] == 255).all(), name
        assert set(label[0].unique().tolist()) <= {0, 2, 5, 255}, name
        assert set(label[1].unique().tolist()) <= {0, 3, 255}, name
    assert out.reg_loss == 0 and out.aff_label.shape == (2, 4, 4)


def test_affinity_loss_balance_weighs_object_pairs_like_background_pairs():
    """loss.aff_balance: 1 object token among 9 background ones. Predicting affinity 1 only for
    background pairs costs little in the paper's loss (one object pair of 101 positives), and half
    the positive term with the balance."""
    labels = torch.zeros(1, 10, dtype=torch.long)
    labels[0, 0] = 1
    target = (labels[:, :, None] == labels[:, None, :]).long()  # (1, 10, 10), no ignore
    background = (labels == 0)[:, :, None] & (labels == 0)[:, None, :]
    pred = background.float()  # 1 for background pairs, 0 elsewhere (object pairs included)
    paper = affinity_loss(pred, target)
    balanced = affinity_loss(pred, target, background)
    assert paper == pytest.approx(0.5 * 1 / (82 + 1))  # the self-pair of the object, 82 positives
    assert balanced == pytest.approx(0.5 * 0.5 * 1 / (1 + 1))
    perfect = target.float()
    assert affinity_loss(perfect, target, background) == 0


def test_regularized_loss_started_early_in_worker_processes_is_the_same():
    """The filter in a pool started right after the forward = the filter inline, bit for bit."""
    results = []
    for workers in (0, 1):
        crf = DenseCRFLoss(workers=workers)
        try:
            g = torch.Generator().manual_seed(3)
            rgb = smooth((2, 3, 46, 39), g)
            logits = torch.randn(2, 5, 46, 39, generator=g, requires_grad=True)
            label = torch.randint(0, 5, (2, 46, 39), generator=g)
            label[:, :8] = 255
            boxes = torch.tensor([[0, 46, 0, 39], [5, 40, 3, 30]])
            pending = crf.start(rgb, logits.softmax(dim=1), boxes)
            loss = pending.loss(label)
            loss.backward()
            results.append((loss.detach(), logits.grad.clone()))
        finally:
            crf.close()
    assert results[0][0].item() != 0
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_a_killed_filter_process_costs_neither_the_step_nor_the_exit(caplog):
    """A filter process killed from outside (the out-of-memory killer, say) breaks the pool. The
    step is filtered in this process with the same numbers, the pool's other processes, which
    ignore SIGTERM, are killed (the pool's own clean-up would wait for them forever, and so would
    the interpreter's exit), and the next step starts new processes."""
    g = torch.Generator().manual_seed(5)
    rgb = smooth((2, 3, 40, 36), g)
    probs = torch.randn(2, 4, 40, 36, generator=g).softmax(dim=1)
    label = torch.randint(0, 4, (2, 40, 36), generator=g)
    boxes = torch.tensor([[0, 40, 0, 36], [2, 38, 4, 30]])
    expected = DenseCRFLoss(workers=0).start(rgb, probs, boxes).loss(label)
    crf = DenseCRFLoss(workers=2)
    try:
        assert torch.equal(crf.start(rgb, probs, boxes).loss(label), expected)  # pool started
        first = crf._pool
        processes = list(first._processes.values())
        assert len(processes) == 2 and all(p.is_alive() for p in processes)
        pending = crf.start(rgb, probs, boxes)
        os.kill(processes[0].pid, signal.SIGKILL)
        deadline = time.time() + 30
        while not first._broken and time.time() < deadline:  # the pool notices the death
            time.sleep(0.01)
        assert first._broken
        with caplog.at_level(logging.WARNING, logger="afa.losses"):
            # The filter may have finished before the kill; then the break shows at the next step.
            got = [pending.loss(label), crf.start(rgb, probs, boxes).loss(label)]
        assert all(torch.equal(x, expected) for x in got)
        assert "filter process of the regularized loss died" in caplog.text
        # The pool's manager thread joins these processes too: when it reaps one first,
        # is_alive() here reads None until that thread has stored the exit code. Poll.
        deadline = time.time() + 30
        while any(p.is_alive() for p in processes) and time.time() < deadline:
            time.sleep(0.05)
        assert not [p for p in processes if p.is_alive()]
        assert crf._pool is not first
        assert torch.equal(crf.start(rgb, probs, boxes).loss(label), expected)  # a new pool
        assert crf._pool is not None and crf._pool is not first
    finally:
        crf.close()


@pytest.mark.cpu_only
@pytest.mark.parametrize("box", [(0, 64, 0, 64), (0, 0, 0, 0)])
def test_crop_whose_pseudo_label_is_all_ignore_gives_finite_losses(box):
    """CAMs inside the uncertain band everywhere (between low 0.35 and high 0.55), or a crop of
    padding only: every pseudo label and affinity label is ignore, a NaN source reported by users
    of the authors' follow-up code. Every loss term, the regularized one included, and every
    gradient stay finite."""
    from afa.losses import DenseCRFLoss
    from afa.pseudo_labels import compute_afa_losses

    torch.manual_seed(0)
    seg_logits = torch.randn(2, 9, 16, 16, requires_grad=True)
    aff_logits = torch.randn(2, 16, 16, requires_grad=True)
    cls_logits = torch.randn(2, 8, requires_grad=True)
    labels = torch.eye(8)[:2]
    terms = compute_afa_losses(
        cls_logits, seg_logits, aff_logits.sigmoid(), torch.full((2, 8, 64, 64), 0.45),
        torch.full((2, 16, 16), 1 / 16), ((4, 4), (4, 4)), torch.rand(2, 3, 64, 64), labels,
        torch.tensor([box, box]), par=PAR(num_iter=3), crf_loss=DenseCRFLoss(),
        affinity_target=True)
    for name in ("refined_label", "aff_pseudo_label", "seg_target", "aff_label"):
        assert (getattr(terms, name) == 255).all(), name
    for name in ("cls_loss", "seg_loss", "aff_loss", "reg_loss", "total"):
        assert torch.isfinite(getattr(terms, name)), name
    terms.total.backward()
    for tensor in (seg_logits, aff_logits, cls_logits):
        assert torch.isfinite(tensor.grad).all()
