"""Can the affinity head alone make the walk beat no walk? (logs/head_refit_20261202/README.md)

    python research/refit_head.py CHECKPOINT N_TRAIN {train,bce} [key=value ...]

Keeps the trained network and refits only its affinity head ``attn_proj`` (16 weights and a
bias: affinity = sigmoid(w . (A + A^T) + b) over the stage-4 attention logits A) by L-BFGS on the
ground-truth pairs within ``cam.radius`` of the first N_TRAIN training images, with the training's
loss (``train``: loss.aff_balance's 1 - s on background and object pairs averaged separately, s on
pairs across labels) or a balanced binary cross-entropy (``bce``). Then scores the val walk with
the checkpoint's head and with the refitted one (tools/ablate_affinity.py's rows, mIoU %).
Run from the repository root. The runs it was made for were 128-px ones: add
``data.root=data/demo data.list_dir=data/demo data.crop_size=128`` (configs/demo_full.yaml now
trains on 144 px)."""
import sys, torch
from pathlib import Path
from afa import config as C
from afa.config import load_config
from afa.engine.run_config import model_config_from_checkpoint
from afa.data import build_datasets, class_names
from afa.models import PAR, AFANet
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from ablate_affinity import PAIRS, ablate, pair_groups

ckpt, n_train, loss_kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
extra = sys.argv[4:]
torch.manual_seed(0)
cfg = load_config("configs/demo_full.yaml", ["data.val_split=train_aug"] + extra)
cfg, _, _ = model_config_from_checkpoint(cfg, ckpt, extra)
_, train = build_datasets(cfg)
cfg2 = load_config("configs/demo_full.yaml", extra)
cfg2, _, _ = model_config_from_checkpoint(cfg2, ckpt, extra)
_, val = build_datasets(cfg2)
model = AFANet(**C.model_kwargs(cfg)); model.load_weights(ckpt); model.eval()
R = cfg.cam.radius
feats, labels, groups = [], [], []
with torch.no_grad():
    for start in range(0, n_train, 16):
        s = [train[i] for i in range(start, min(start + 16, n_train))]
        img = torch.stack([x["image"] for x in s]); mask = torch.stack([x["mask"] for x in s])
        out = model(img)
        A = torch.cat(out.attn_logits, 1)  # B,16,N,N
        A = A + A.transpose(-1, -2)
        groups_of = pair_groups(mask, out.grid, R)  # tools/ablate_affinity.py's pair groups
        valid = sum(groups_of.values()).bool()
        group = torch.full(valid.shape, 2)  # 0 background pairs, 1 same object, 2 across labels
        group[groups_of[PAIRS[0]]] = 0
        group[groups_of[PAIRS[1]]] = 1
        feats.append(A.permute(0, 2, 3, 1)[valid])  # P, 16
        labels.append((group[valid] < 2).float())
        groups.append(group[valid])
X = torch.cat(feats); y = torch.cat(labels); g = torch.cat(groups)
print("pairs", X.shape, "bgbg/fg/diff", [(g == k).sum().item() for k in range(3)])
w0 = model.attn_proj.weight.detach().flatten().clone(); b0 = model.attn_proj.bias.detach().clone()

def loss_fn(w, b):
    s = torch.sigmoid(X @ w + b)
    if loss_kind == "bce":
        l = torch.nn.functional.binary_cross_entropy(s.clamp(1e-6, 1 - 1e-6), y, reduction="none")
        return sum(l[g == k].mean() for k in range(3)) / 3
    # the training loss (aff_balance): 1-s on bg-bg and fg-same, averaged separately, s on diff
    return 0.25 * (1 - s[g == 0]).mean() + 0.25 * (1 - s[g == 1]).mean() + 0.5 * s[g == 2].mean()

def wrong(w, b):
    s = torch.sigmoid(X @ w + b)
    return [round(100 * ((s[g == k] < 0.5) if k < 2 else (s[g == k] >= 0.5)).float().mean().item(), 1) for k in range(3)]

print("checkpoint head: loss", loss_fn(w0, b0).item(), "wrong side %", wrong(w0, b0))
w = w0.clone().requires_grad_(True); b = b0.clone().requires_grad_(True)
opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")
def closure():
    opt.zero_grad(); l = loss_fn(w, b); l.backward(); return l
opt.step(closure)
print("refit head: loss", loss_fn(w, b).item(), "wrong side %", wrong(w, b))
print("w0", w0.tolist(), "b0", b0.item()); print("w", w.tolist(), "b", b.item())
par = PAR(**C.par_kwargs(cfg2))
names = class_names(cfg2)
def run():
    sc = ablate(model, val, par=par, device=torch.device("cpu"), cam_scales=tuple(cfg2.cam.scales),
                bkg_score=cfg2.cam.thresholds.background, low=cfg2.cam.thresholds.low, radius=cfg2.cam.radius,
                class_names=names, progress=False)
    return {k: round(100 * sc[k]["miou"], 2) for k in ("bkg_score/argmax", "grid/argmax", "learned/argmax", "perfect/argmax", "grid/par", "learned/par")}
print("val checkpoint head", run())
with torch.no_grad():
    model.attn_proj.weight.copy_(w.detach().view_as(model.attn_proj.weight)); model.attn_proj.bias.copy_(b.detach())
print("val refit head", run())
