"""Engine pieces on their own: the schedule, optimiser groups (on ``TORCH_DEVICE``), checkpoints
and the gradient scaler's state in them, the data order."""

import pytest
import torch

from afa import config as C
from afa.config import ConfigError, load_config
from afa.engine.checkpoint import CheckpointManager, load_scaler_state
from afa.engine.data_order import ResumableSampler
from afa.engine.optim import build_optimizer, lr_at, set_lr
from afa.models import AFANet


def test_lr_warmup_then_poly():
    base, max_iters, warmup = 6e-5, 20000, 1500
    assert lr_at(0, base, max_iters, warmup, 1e-6) == pytest.approx(base * 1e-6)
    assert lr_at(750, base, max_iters, warmup, 1e-6) == pytest.approx(base * (1e-6 + (1 - 1e-6) / 2))
    assert lr_at(1500, base, max_iters, warmup, 1e-6) == pytest.approx(base * (1 - 1500 / 20000))
    assert lr_at(10000, base, max_iters, warmup, 1e-6) == pytest.approx(base * 0.5)
    assert lr_at(20000, base, max_iters, warmup, 1e-6) == 0.0
    assert lr_at(15000, base, max_iters, 0, power=2.0) == pytest.approx(base * 0.25 ** 2)


def test_optimizer_groups_follow_the_multipliers(device):
    """On the device: the fused AdamW kernels of that device keep the frozen norms frozen."""
    model = AFANet("mit_b0", num_classes=4).to(device)
    opt = build_optimizer(model.param_groups(), lr=1e-3, weight_decay=0.01)
    set_lr(opt, 2e-3)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"backbone": 2e-3, "backbone_norm": 0.0, "heads": 2e-2, "decoder": 2e-2}
    norm = next(g for g in opt.param_groups if g["name"] == "backbone_norm")["params"][0]
    before = norm.detach().clone()
    model(torch.randn(1, 3, 32, 32, device=device)).cls_logits.sum().backward()
    heads = next(g for g in opt.param_groups if g["name"] == "heads")["params"][0]
    heads_before = heads.detach().clone()
    opt.step()
    assert torch.equal(norm, before)  # AFA freezes the backbone norms (lr 0)
    assert not torch.equal(heads, heads_before)


def test_config_lr_mults_override_the_groups():
    assert C.lr_mults(load_config(None)) == {"backbone": 1.0, "backbone_norm": 0.0,
                                              "heads": 10.0, "decoder": 10.0}  # the paper's
    cfg = load_config(None, ["optim.lr_mults.heads=1", "optim.lr_mults.backbone_norm=1"])
    model = AFANet("mit_b0", num_classes=4)
    opt = build_optimizer(model.param_groups(), lr=1e-3, weight_decay=0.01,
                          lr_mults=C.lr_mults(cfg))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"backbone": 1e-3, "backbone_norm": 1e-3, "heads": 1e-3, "decoder": 1e-2}
    with pytest.raises(ConfigError, match="optim.lr_mults.classifier"):
        load_config(None, ["optim.lr_mults.classifier=1"])
    with pytest.raises(ValueError, match="unknown parameter groups"):
        build_optimizer(model.param_groups(), 1e-3, 0.01, lr_mults={"classifier": 1.0})


def _training_state(iteration: int) -> dict:
    return {"model": {}, "optimizer": {}, "iteration": iteration, "config": {}, "rng": [],
            "data": {}}


def test_checkpoint_manager_keeps_last_and_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.find_resume("auto") is None and manager.find_resume(None) is None
    for it in (2, 4, 6):
        manager.save(_training_state(it), it, is_best=it == 4)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pth", "iter_000004.pth", "iter_000006.pth"]
    assert torch.load(tmp_path / "best.pth", weights_only=True)["iteration"] == 4
    found = manager.find_resume("auto")
    assert found.path == tmp_path / "iter_000006.pth" and found.state["iteration"] == 6
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        manager.find_resume(str(tmp_path / "missing.pth"))


def _stream(world, batch, global_batch, batches_per_rank, start=0):
    """Per optimiser step, the set of samples and seeds the ranks consume together."""
    accum = global_batch // (batch * world)
    iters = [iter(ResumableSampler(10, batch, global_batch, seed=5, rank=r, world_size=world,
                                   start_batches=start * accum)) for r in range(world)]
    steps = []
    for _ in range(batches_per_rank // accum):
        step = []
        for _ in range(accum):
            for it in iters:
                step += [next(it) for _ in range(batch)]
        steps.append(sorted(step))
    return steps


def test_data_order_is_independent_of_world_size_and_resumable():
    one = _stream(world=1, batch=2, global_batch=4, batches_per_rank=12)
    two = _stream(world=2, batch=2, global_batch=4, batches_per_rank=6)
    four = _stream(world=4, batch=1, global_batch=4, batches_per_rank=6)
    assert one == two == four
    assert _stream(world=2, batch=2, global_batch=4, batches_per_rank=4, start=2) == two[2:]
    # An epoch of 10 images with global batch 4 uses 8 distinct images, then reshuffles.
    first_epoch = [index for step in one[:2] for index, _ in step]
    assert len(set(first_epoch)) == 8
    seeds = [seed for step in one for _, seed in step]
    assert len(set(seeds)) == len(seeds)


def test_run_record_tells_a_module_without_package_metadata_from_a_missing_one(monkeypatch):
    """pydensecrf2 built from source onto the path has no package metadata but works: the log
    must not call it missing (seen on the GPU machine)."""
    import importlib.util
    from importlib import metadata

    from afa.engine.logger import run_record

    real_version, real_find = metadata.version, importlib.util.find_spec

    def version(name):
        if name in ("pydensecrf2", "omegaconf"):
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "omegaconf" else real_find(name, *a))
    libraries = next(line for line in run_record(["x"]) if line.startswith("libraries:"))
    assert "pydensecrf2 version unknown (importable, no package metadata)" in libraries
    assert "omegaconf not installed" in libraries
    assert f"numpy {real_version('numpy')}" in libraries


@pytest.mark.cpu_only
def test_scaler_state_follows_the_amp_setting():
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    assert "starts afresh" in load_scaler_state(fresh, {})  # was fp32/bf16, now fp16
    saved = torch.amp.GradScaler("cpu", init_scale=8.0).state_dict()
    assert load_scaler_state(fresh, saved) is None and fresh.get_scale() == 8.0
    disabled = torch.amp.GradScaler("cpu", enabled=False)  # was fp16, now bf16/fp32
    assert load_scaler_state(disabled, saved) is None
