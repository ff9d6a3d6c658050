"""afa.engine.step: one training step (``train_step``) on a tiny network. No host-device sync in
the step, pseudo labels from host copies of the boxes and class counts, the regularized loss's
filter started before the CAMs, bf16 on the CPU, the training forward reused as the scale-1 CAM.
Tests that take ``device`` run on ``TORCH_DEVICE`` (see conftest)."""

import dataclasses
import math

import pytest
import torch

from afa import config as C
from afa.config import load_config
from afa.engine.schedule import Schedule
from afa.engine.step import StepSettings, train_step
from afa.losses import DenseCRFLoss
from afa.models import PAR, AFANet
from conftest import DEMO_CONFIG, assert_same_labels, device_tol, smooth


def _tiny_step_setup(device, **overrides):
    cfg = C.load_config(DEMO_CONFIG, [
        "model.backbone=mit_b0", "model.embedding_dim=32", "model.pretrained=null",
        "train.cam_iters=0", "train.aff_switch_iter=0", "train.lean_forwards=false",
        *[f"{k}={v}" for k, v in overrides.items()]])
    torch.manual_seed(0)
    model = AFANet(**C.model_kwargs(cfg)).to(device).train()
    g = torch.Generator().manual_seed(2)
    image = (smooth((2, 3, 75, 66), g) - 0.45) / 0.25  # odd crop, not a multiple of 16
    label = torch.zeros(2, 8)
    label[0, 2] = label[1, [1, 5]] = 1
    batch = {"image": image, "label": label, "box": torch.tensor([[0, 75, 0, 66], [4, 70, 9, 60]])}
    # Iteration 5's phase: joint and on the affinity target, unless train.cam_iters says later.
    kwargs = dict(phase=Schedule.from_config(cfg).phase(5),
                  settings=StepSettings.from_config(cfg, "none"),
                  device=device, par=PAR(**C.par_kwargs(cfg)).to(device), crf_loss=None)
    return cfg, model, batch, kwargs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host-device sync exists only on CUDA")
@pytest.mark.parametrize("overrides", [{}, {"loss.aff_balance": "true"}, {"train.cam_iters": 9}],
                         ids=["joint", "aff_balance", "classification"])
def test_training_step_never_waits_for_the_gpu(device, overrides):
    if device.type != "cuda":
        pytest.skip("TORCH_DEVICE is not cuda")
    _, model, batch, kwargs = _tiny_step_setup(device, **overrides)
    batch = {k: v.pin_memory() for k, v in batch.items()}
    train_step(model, batch, **kwargs).terms.total.backward()  # warm-up: lazy inits may sync
    model.zero_grad()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step = train_step(model, batch, **kwargs)
        step.terms.total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(step.terms.total).item()


def test_pseudo_labels_from_host_copies_equal_those_read_from_the_device(device):
    """The trainer passes boxes and class counts read from the CPU batch; same labels."""
    from afa.pseudo_labels import make_pseudo_labels

    g = torch.Generator().manual_seed(4)
    batch, size, grid = 3, (61, 50), (4, 4)
    cam = smooth((batch, 5, *size), g)
    labels = torch.zeros(batch, 5)
    labels[0, 1] = labels[1, [0, 2]] = labels[2, [1, 3, 4]] = 1
    aff = torch.rand(batch, 16, 16, generator=g)
    aff = (aff + aff.transpose(1, 2)) / 2
    rgb = smooth((batch, 3, *size), g)
    boxes = torch.tensor([[0, 61, 0, 50], [5, 55, 7, 41], [0, 30, 0, 50]])
    to = lambda *ts: [t.to(device) for t in ts]
    kwargs = dict(par=PAR(dilations=(1, 2, 4), num_iter=4).to(device), aff_grid=grid, radius=2)
    cam, labels, rgb, boxes_d, aff = to(cam, labels, rgb, boxes, aff)
    read = make_pseudo_labels(cam, labels, rgb, boxes_d, aff=aff, **kwargs)
    given = make_pseudo_labels(cam, labels, rgb, boxes_d, aff=aff, box_list=boxes.tolist(),
                               max_present=3, **kwargs)
    for name in ("cam_label", "refined_label", "aff_pseudo_label"):
        assert torch.equal(getattr(read, name), getattr(given, name)), name
    assert (given.aff_pseudo_label[2, 30:] == 255).all()  # below the box


def test_train_step_with_regularized_loss_started_early_matches_the_plain_call(device):
    """train_step starts the filter before the CAMs; compute_afa_losses with the module itself
    (filter after the pseudo labels) must give the same terms."""
    from afa.pseudo_labels import compute_afa_losses
    from afa.data import denormalize

    _, model, batch, kwargs = _tiny_step_setup(device)
    model.eval()  # deterministic forwards for the two calls
    crf = DenseCRFLoss(scale_factor=0.5)
    kwargs["crf_loss"] = crf
    step = train_step(model, batch, **kwargs)
    out = model(batch["image"].to(device))
    from afa.cam import multi_scale_cam
    settings = kwargs["settings"]
    cams = multi_scale_cam(model, batch["image"].to(device), settings.cam_scales)
    plain = compute_afa_losses(out.cls_logits, out.seg_logits, out.aff_pred, cams.cam, cams.aff,
                               (out.grid, cams.aff_grid), denormalize(batch["image"].to(device)),
                               batch["label"].to(device), batch["box"].to(device),
                               par=kwargs["par"], crf_loss=crf, joint=True, affinity_target=True,
                               thresholds=settings.thresholds, radius=settings.radius,
                               w_seg=settings.w_seg, w_aff=settings.w_aff, w_reg=settings.w_reg,
                               aff_balance=settings.aff_balance)
    assert step.terms.reg_loss.item() != 0
    for name in ("cls_loss", "seg_loss", "aff_loss", "reg_loss", "total"):
        torch.testing.assert_close(getattr(step.terms, name), getattr(plain, name),
                                   rtol=1e-5, atol=1e-9, msg=name)


def test_bf16_step_on_cpu_keeps_the_pseudo_labels_in_fp32(monkeypatch):
    """train.amp=bf16 runs on CPU; the random walk and PAR see float32 outside autocast."""
    import afa.pseudo_labels as pl

    seen = []
    original = pl.propagate_cams

    def spy(cams, labels, aff, grid, **kwargs):
        seen.append((cams.dtype, aff.dtype, torch.is_autocast_enabled("cpu")))
        return original(cams, labels, aff, grid, **kwargs)

    monkeypatch.setattr(pl, "propagate_cams", spy)
    _, model, batch, kwargs = _tiny_step_setup(torch.device("cpu"))
    fp32 = train_step(model, batch, **kwargs)
    bf16 = train_step(model, batch, **{**kwargs, "settings": dataclasses.replace(
        kwargs["settings"], amp="bf16")})
    assert seen and all(s == (torch.float32, torch.float32, False) for s in seen)
    assert torch.isfinite(bf16.terms.total)
    assert math.isclose(bf16.terms.cls_loss.item(), fp32.terms.cls_loss.item(), rel_tol=0.05)
    agree = (bf16.terms.refined_label == fp32.terms.refined_label).float().mean().item()
    assert agree > 0.9, agree


@pytest.mark.parametrize("scales", [(1.0, 0.5), (1.0, 0.5, 1.5)])
def test_reusing_the_training_forward_as_the_scale_1_cam(scales, device):
    """train.lean_forwards reuses the training forward as the CAM's scale-1 copy: the same CAMs,
    pseudo labels and losses as a second forward when the backbone is deterministic; different
    ones under drop-path (hence an option, off by default)."""
    cfg = load_config(DEMO_CONFIG, ["train.cam_iters=0", "train.aff_switch_iter=0",
                                    f"cam.scales=[{','.join(map(str, scales))}]"])
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    batch = {"image": images, "label": torch.tensor([[1.0, 0, 0, 1, 0, 0, 0, 0],
                                                      [0, 0, 1.0, 0, 0, 0, 0, 0]]),
             "box": torch.tensor([[0, 64, 0, 64], [0, 48, 8, 64]])}
    settings = StepSettings.from_config(cfg, "none")
    par = PAR(num_iter=3).to(device)

    def step(drop_path: float, reuse: bool):
        torch.manual_seed(1)  # the same weights, and the same drop-path draws, every call
        model = AFANet("mit_b0", num_classes=9, embedding_dim=32,
                       drop_path_rate=drop_path).to(device).train()
        phase = dataclasses.replace(Schedule.from_config(cfg).phase(0), reuse_forward=reuse)
        return train_step(model, batch, phase, settings, par=par, device=device)

    plain, reused = step(0.0, False), step(0.0, True)
    # 1.0 largest: the very same explicit-attention forward; else the reused copy ran explicit
    # attention where the batched second forward runs the fused kernel (rounding only).
    atol = 0.0 if max(scales) == 1.0 else device_tol(device, 0, 1e-5)["atol"]
    torch.testing.assert_close(reused.cam, plain.cam, rtol=0, atol=atol)
    for name in ("refined_label", "aff_pseudo_label", "aff_label"):
        assert_same_labels(getattr(reused.terms, name), getattr(plain.terms, name), device, name)
    for name in ("cls_loss", "seg_loss", "aff_loss", "total"):
        torch.testing.assert_close(getattr(reused.terms, name), getattr(plain.terms, name),
                                   **device_tol(device, 1e-5, 0), msg=name)
    noisy_plain, noisy_reused = step(0.5, False), step(0.5, True)
    assert not torch.allclose(noisy_reused.cam, noisy_plain.cam, atol=1e-3)
