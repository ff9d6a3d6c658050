"""AdamW over named parameter groups, and the learning rate as a pure function of the iteration."""

from __future__ import annotations

import torch

__all__ = ["build_optimizer", "load_optimizer_state", "lr_at", "set_lr"]


def build_optimizer(param_groups: list[dict], lr: float, weight_decay: float,
                    betas=(0.9, 0.999), lr_mults: dict | None = None) -> torch.optim.AdamW:
    """AdamW with one group per named group; each keeps ``name`` and ``lr_mult`` for the schedule.

    ``lr_mults`` (``{name: multiplier}``) replaces the groups' own multipliers; a name that is not
    a group is an error.

    The fused implementation (CUDA and CPU): a few kernels per step instead of several per
    parameter, and a step can be dropped on the device (``optimizer.found_inf``, a float tensor
    that is non-zero to skip: weights, moments and step count stay) without a host sync. Its
    updates equal the unfused AdamW's to about one unit in the last place.
    """
    lr_mults = dict(lr_mults or {})
    unknown = set(lr_mults) - {g["name"] for g in param_groups}
    if unknown:
        raise ValueError(f"lr_mults names unknown parameter groups {sorted(unknown)}; the groups "
                         f"are {[g['name'] for g in param_groups]}")
    groups = []
    for g in param_groups:
        mult = float(lr_mults.get(g["name"], g["lr_mult"]))
        if g["params"]:
            groups.append({"params": g["params"], "name": g["name"], "lr_mult": mult,
                           "lr": lr * mult})
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                             fused=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping this optimizer's implementation.

    A state dict carries its optimizer's ``fused``/``foreach`` flags in every group and would put
    them back: a checkpoint of the unfused AdamW (before 2026-11-30) would turn the fused one
    unfused, whose step refuses ``found_inf``. The flags stay ours, and the step counts move to
    the parameters' devices as the fused implementation keeps them.
    """
    flags = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g}
             for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)
        if group.get("fused"):
            for p in group["params"]:
                step = optimizer.state.get(p, {}).get("step")
                if step is not None:
                    optimizer.state[p]["step"] = torch.as_tensor(
                        step, dtype=torch.float32).to(p.device)


def lr_at(iteration: int, base_lr: float, max_iters: int, warmup_iters: int = 1500,
          warmup_ratio: float = 1e-6, power: float = 1.0) -> float:
    """Base learning rate at ``iteration`` (0-based): linear warm-up, then polynomial decay.

    Warm-up rises linearly from ``warmup_ratio * base_lr`` to ``base_lr`` over ``warmup_iters``;
    after it the rate is ``base_lr * (1 - iteration / max_iters) ** power``, reaching 0 at the end.
    """
    if iteration < warmup_iters:
        return base_lr * (warmup_ratio + (1.0 - warmup_ratio) * iteration / warmup_iters)
    return base_lr * (1.0 - min(iteration, max_iters) / max_iters) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
