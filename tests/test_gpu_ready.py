"""The GPU-ready training step: one PAR call per batch, no host-device sync in an iteration, the
regularized loss's filter started early, steps dropped on the device, bf16 on CPU, batched
validation. Tests that take ``device`` run on ``TORCH_DEVICE`` (see conftest)."""

import copy
import dataclasses
import logging
import math
import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F

from afa import config as C
from afa.cam import _combine_high_low, present_classes, refine_propagated_cams
from afa.data import build_datasets, class_names
from afa.engine import trainer as trainer_module
from afa.engine.optim import build_optimizer
from afa.engine.schedule import Schedule
from afa.engine.step import StepSettings, train_step
from afa.engine.trainer import train
from afa.engine.validate import validate
from afa.losses import DenseCRFLoss
from afa.models import PAR, AFANet
from conftest import DEMO_CONFIG, assert_same_labels, tiny_overrides


def _smooth(shape, generator):
    """Blobby values in [0, 1] (upsampled noise): PAR and the CAMs see structure, not static."""
    small = torch.rand(*shape[:-2], max(2, shape[-2] // 6), max(2, shape[-1] // 6),
                       generator=generator)
    return F.interpolate(small, size=shape[-2:], mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------
# PAR: every crop of a batch in one call
# ------------------------------------------------------------------------------------------------


def test_par_with_bounds_equals_one_call_per_image(device):
    g = torch.Generator().manual_seed(0)
    par = PAR(dilations=(1, 2, 4, 8), num_iter=5).to(device)
    sizes = [(37, 53), (61, 29), (23, 23), (61, 53)]  # odd, portrait, landscape, the canvas
    canvas = (61, 53)
    rgbs = [_smooth((1, 3, *s), g) for s in sizes]
    masks = [_smooth((1, 4, *s), g).softmax(dim=1) for s in sizes]
    pad = lambda x: F.pad(x, (0, canvas[1] - x.shape[-1], 0, canvas[0] - x.shape[-2]), value=7.0)
    batched = par(torch.cat([pad(r) for r in rgbs]).to(device),
                  torch.cat([pad(m) for m in masks]).to(device),
                  bounds=torch.tensor(sizes, device=device))
    for i, (h, w) in enumerate(sizes):
        alone = par(rgbs[i].to(device), masks[i].to(device))
        torch.testing.assert_close(batched[i:i + 1, :, :h, :w], alone, rtol=1e-5, atol=1e-6)


def _per_crop_reference(par, rgb, walked_high, walked_low, labels, boxes, ignore_index=255):
    """The per-image loop refine_propagated_cams used to be (one PAR call per box crop)."""
    batch, _, height, width = walked_high.shape
    index, valid = present_classes(labels)
    label = torch.full((batch, height, width), ignore_index, dtype=torch.long)
    for b, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        if y1 <= y0 or x1 <= x0:
            continue
        keys = index[b][valid[b]]
        small = (max(1, (y1 - y0) // 2), max(1, (x1 - x0) // 2))
        small_rgb = F.interpolate(rgb[b:b + 1, :, y0:y1, x0:x1], size=small, mode="bilinear",
                                  align_corners=False)
        stack = torch.cat([walked_high[b:b + 1, keys, y0:y1, x0:x1],
                           walked_low[b:b + 1, keys, y0:y1, x0:x1]], dim=1)
        refined = F.interpolate(par(small_rgb, stack), size=(y1 - y0, x1 - x0),
                                mode="bilinear", align_corners=False)
        high, low = (keys[part.max(dim=1).indices] for part in refined.chunk(2, dim=1))
        label[b:b + 1, y0:y1, x0:x1] = _combine_high_low(high, low, ignore_index)
    return label


def test_affinity_pseudo_label_of_a_batch_equals_the_per_crop_loop(device):
    g = torch.Generator().manual_seed(1)
    par = PAR(dilations=(1, 2, 4, 8), num_iter=5)
    batch, classes, size = 4, 6, (58, 47)
    rgb = _smooth((batch, 3, *size), g)
    labels = torch.zeros(batch, classes - 1)
    labels[0, 1] = labels[1, [0, 3, 4]] = labels[2, 2] = labels[3, [1, 2]] = 1
    walked_high = _smooth((batch, classes, *size), g) * F.pad(labels, (1, 0), value=1)[..., None, None]
    walked_low = walked_high * torch.linspace(0.5, 1.5, classes)[None, :, None, None]
    boxes = torch.tensor([[0, 58, 0, 47], [3, 50, 5, 36], [0, 0, 0, 0], [11, 58, 0, 21]])
    expected = _per_crop_reference(par, rgb, walked_high, walked_low, labels, boxes)
    host = dict(box_list=boxes.tolist(), max_present=3)
    got = refine_propagated_cams(par.to(device), rgb.to(device), walked_high.to(device),
                                 walked_low.to(device), labels.to(device), boxes.to(device),
                                 **host)
    assert_same_labels(got, expected, device, "affinity pseudo label")
    assert (got[2] == 255).all()  # the crop of padding only


# ------------------------------------------------------------------------------------------------
# One training step
# ------------------------------------------------------------------------------------------------


def _tiny_step_setup(device, **overrides):
    cfg = C.load_config(DEMO_CONFIG, [
        "model.backbone=mit_b0", "model.embedding_dim=32", "model.pretrained=null",
        "train.cam_iters=0", "train.aff_switch_iter=0", "train.lean_forwards=false",
        *[f"{k}={v}" for k, v in overrides.items()]])
    torch.manual_seed(0)
    model = AFANet(**C.model_kwargs(cfg)).to(device).train()
    g = torch.Generator().manual_seed(2)
    image = (_smooth((2, 3, 75, 66), g) - 0.45) / 0.25  # odd crop, not a multiple of 16
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
    cam = _smooth((batch, 5, *size), g)
    labels = torch.zeros(batch, 5)
    labels[0, 1] = labels[1, [0, 2]] = labels[2, [1, 3, 4]] = 1
    aff = torch.rand(batch, 16, 16, generator=g)
    aff = (aff + aff.transpose(1, 2)) / 2
    rgb = _smooth((batch, 3, *size), g)
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


def test_regularized_loss_started_early_in_worker_processes_is_the_same():
    """The filter in a pool started right after the forward = the filter inline, bit for bit."""
    results = []
    for workers in (0, 1):
        crf = DenseCRFLoss(workers=workers)
        try:
            g = torch.Generator().manual_seed(3)
            rgb = _smooth((2, 3, 46, 39), g)
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
    rgb = _smooth((2, 3, 40, 36), g)
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


def test_a_bf16_training_run_on_cpu(tiny_data, tmp_path):
    cfg = C.load_config(DEMO_CONFIG, tiny_overrides(tiny_data, tmp_path, **{
        "device": "cpu", "train.amp": "bf16", "train.max_iters": 2, "train.eval_iters": 2}))
    result = train(cfg)
    assert set(result.scores) >= {"cam", "seg", "aff_cam"}
    assert all(math.isfinite(result.scores[k]["miou"]) for k in ("cam", "seg"))


# ------------------------------------------------------------------------------------------------
# A dropped step, without a sync
# ------------------------------------------------------------------------------------------------


def test_found_inf_drops_the_optimizer_step_on_the_device(device):
    model = torch.nn.Linear(5, 3).to(device)
    groups = [{"name": "all", "lr_mult": 1.0, "params": list(model.parameters())}]
    optimizer = build_optimizer(groups, lr=0.1, weight_decay=0.01)
    model(torch.ones(2, 5, device=device)).sum().backward()
    optimizer.found_inf = torch.zeros((), device=device)
    optimizer.step()
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    optimizer.found_inf = torch.ones((), device=device)
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(v, optimizer.state[model.weight][k]) for k, v in state.items())


def test_skipped_steps_are_reported_at_the_log_interval(tiny_data, tmp_path, monkeypatch):
    """log_iters 2: a NaN at iteration 0 is dropped at once and reported at iteration 2."""
    original = trainer_module.train_step

    def step(model, batch, phase, *args, **kwargs):
        if phase.iteration == 0:
            batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
        return original(model, batch, phase, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", step)
    cfg = C.load_config(DEMO_CONFIG, tiny_overrides(tiny_data, tmp_path, **{
        "train.nonfinite": "skip", "train.max_iters": 2, "train.log_iters": 2,
        "train.eval_iters": 100, "train.ckpt_iters": 100, "train.image_log_iters": 0}))
    train(cfg)
    log = (tmp_path / "train.log").read_text()
    assert "Non-finite loss or gradient at iteration 0" in log
    state = torch.load(tmp_path / "checkpoints" / "iter_000002.pth", weights_only=True)
    assert int(state["optimizer"]["state"][0]["step"]) == 1


# ------------------------------------------------------------------------------------------------
# Validation in batches of equal-size images
# ------------------------------------------------------------------------------------------------


def test_batched_validation_scores_equal_one_image_at_a_time(tiny_data, tmp_path):
    cfg = C.load_config(DEMO_CONFIG, tiny_overrides(tiny_data, tmp_path))
    _, val_set = build_datasets(cfg)
    torch.manual_seed(0)
    model = AFANet(**{**C.model_kwargs(cfg), "pretrained": None})
    kwargs = dict(par=PAR(**C.par_kwargs(cfg)), device=torch.device("cpu"),
                  cam_scales=tuple(cfg.cam.scales), thresholds=C.thresholds(cfg),
                  radius=cfg.cam.radius, class_names=class_names(cfg))
    single = validate(model, val_set, batch_size=1, **kwargs)
    batched = validate(model, val_set, batch_size=4, **kwargs)
    assert len(val_set) >= 2
    for kind in ("cam", "refined", "aff_cam", "affinity", "seg"):
        assert batched[kind]["miou"] == pytest.approx(single[kind]["miou"], abs=1e-4), kind
    assert batched["cls_f1"] == pytest.approx(single["cls_f1"])


def test_config_rejects_a_validation_batch_below_one():
    with pytest.raises(C.ConfigError, match="data.val_batch"):
        C.load_config(DEMO_CONFIG, ["data.val_batch=0"])


# ------------------------------------------------------------------------------------------------
# The decoder without its stride-4 concatenation
# ------------------------------------------------------------------------------------------------


def _concat_head(head, features):
    """SegFormer's head as written: project, upsample, concatenate deepest first, fuse."""
    size = features[0].shape[2:]
    projected = []
    for i in reversed(range(len(features))):
        x = getattr(head, f"linear_c{i + 1}")(features[i])
        projected.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                         if x.shape[2:] != size else x)
    x = head.linear_fuse(torch.cat(projected, dim=1))
    return head.linear_pred(head.dropout(x))


def test_decoder_equals_the_concatenating_head_values_gradients_and_statistics(device):
    from afa.models.segformer_head import SegFormerHead

    torch.manual_seed(0)
    dims = (32, 64, 160, 256)
    head = SegFormerHead(dims, embed_dim=48, num_classes=9, dropout=0.0).to(device).train()
    reference = SegFormerHead(dims, embed_dim=48, num_classes=9, dropout=0.0).to(device).train()
    reference.load_state_dict(head.state_dict())
    # A 75 x 66 crop at AFA's strides 4, 8, 16, 16: stages 3 and 4 share a grid.
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(2, c, h, w, generator=g).to(device)
                for c, (h, w) in zip(dims, [(19, 17), (10, 9), (5, 5), (5, 5)])]
    out = head(features)
    expected = _concat_head(reference, features)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    # Float32 rounding relative to the largest gradient; the projection biases' gradients are 0
    # up to that rounding (train-mode BatchNorm removes any constant shift).
    scale = max(q.grad.abs().max().item() for q in reference.parameters())
    for (name, p), q in zip(head.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=2e-6 * scale, msg=name)
    for (name, b), c in zip(head.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)
    # update_statistics: the same running statistics, no output.
    stats = SegFormerHead(dims, embed_dim=48, num_classes=9).to(device).train()
    stats.load_state_dict(reference.state_dict())
    with torch.no_grad():
        stats.update_statistics(features)
        reference(features)
    for (name, b), c in zip(stats.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)


def test_a_checkpoint_of_the_unfused_optimizer_resumes_with_the_fused_one(device):
    """Checkpoints from before the fused AdamW carry fused=None in their groups; loading one must
    keep the fused implementation (whose found_inf drops steps) and continue the same numbers."""
    from afa.engine.optim import load_optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(device)
    groups = lambda m: [{"name": "all", "lr_mult": 1.0, "params": list(m.parameters())}]
    old = torch.optim.AdamW([{"params": list(model.parameters()), "name": "all",
                              "lr_mult": 1.0}], lr=0.1, weight_decay=0.01)
    for _ in range(3):
        model(torch.ones(2, 4, device=device)).square().sum().backward()
        old.step()
        old.zero_grad()
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_state = copy.deepcopy(old.state_dict())  # as from a checkpoint file: no aliasing
    fused = build_optimizer(groups(model), lr=0.1, weight_decay=0.01)
    load_optimizer_state(fused, copy.deepcopy(saved_state))
    assert all(g["fused"] for g in fused.param_groups)
    model(torch.ones(2, 4, device=device)).square().sum().backward()
    fused.found_inf = torch.zeros((), device=device)
    fused.step()  # the unfused path would refuse found_inf
    step = fused.state[model.weight]["step"]
    assert float(step) == 4 and step.device == model.weight.device
    # The same update as the unfused optimizer continuing from the same state.
    twin = torch.nn.Linear(4, 3).to(device)
    twin.load_state_dict(saved_weights)
    reference = torch.optim.AdamW([{"params": list(twin.parameters()), "name": "all",
                                    "lr_mult": 1.0}], lr=0.1, weight_decay=0.01)
    reference.load_state_dict(saved_state)
    twin(torch.ones(2, 4, device=device)).square().sum().backward()
    reference.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
