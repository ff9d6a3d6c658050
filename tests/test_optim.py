"""afa.engine.optim: the fused AdamW drops a step flagged by ``found_inf`` on the device (no
host-device sync), and resumes from a checkpoint of the unfused optimizer. On ``TORCH_DEVICE``
(see conftest); the learning-rate schedule and the parameter groups are in test_engine.py."""

import copy

import torch

from afa.engine.optim import build_optimizer


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
