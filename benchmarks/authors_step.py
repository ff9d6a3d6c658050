"""Our training iteration against the authors' implementation of the same iteration, side by side.

    git clone https://github.com/rulixiang/afa /path/to/afa_authors   # commit 2c87c7f or later
    python benchmarks/authors_step.py --authors-repo /path/to/afa_authors \\
        --backbone mit_b1 --crop 320 --batch 2 --threads 2 --rounds 3

Both iterations run in this process on the same random batch (1-2 random classes of 20 per image,
full boxes), alternately ours, theirs, ours, ...: a machine that gets busier or quieter during the
run affects both alike. Freed host memory is kept for reuse (``afa.host_memory``, as our trainer
does) for both; ``AFA_KEEP_HOST_MEMORY=0`` runs both with glibc's defaults, and ``--only`` times
one of them per process (each with its own setting). Each timed iteration starts from the same
model and optimizer state (the state after one warm-up iteration; see docs/BENCHMARKS.md on
drifting random models).

- Ours: ``afa.engine.step.train_step`` + backward + the fused AdamW step, with the paper's VOC
  config (``configs/voc.yaml`` defaults: CAM scales 1.0/0.5/1.5, PAR 10 iterations, decoder
  statistics updated by the CAM forwards as theirs are) and the regularized loss off, as in their
  released ``scripts/dist_train_voc.py``.
- Theirs: the body of the training loop of their ``scripts/dist_train_voc.py`` from the forward to
  ``optimizer.step()`` (past ``cam_iters`` and iteration 6000: every step runs), calling their
  ``WeTr``, ``PAR``, ``utils.camutils`` and ``utils.losses`` functions and their
  ``PolyWarmupAdamW``; logging and TensorBoard left out.

Their code imports ``timm`` (``DropPath``, ``to_2tuple``, ``trunc_normal_``) and ``mmcv``
(``ConvModule``, for the decoder's 1x1 convolution + BN + ReLU). Where those packages are not
installed this script registers minimal stand-ins for exactly those names (BatchNorm in place of
their SyncBN: the same thing in one process). Nothing of theirs is copied into this repository;
their checkout is only imported.

The last line of output is one JSON object: medians, minima, the ratio ours / theirs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from afa import config as C  # noqa: E402
from afa.affinity import radius_mask  # noqa: E402
from afa.engine.optim import build_optimizer  # noqa: E402
from afa.engine.schedule import Schedule  # noqa: E402
from afa.engine.step import StepSettings, train_step  # noqa: E402
from afa.host_memory import keep_freed_host_memory  # noqa: E402
from afa.models import PAR, AFANet  # noqa: E402
from benchmarks.train_step import random_batch  # noqa: E402


def _install_stand_ins() -> list[str]:
    """Register ``timm.models.layers`` and ``mmcv.cnn`` stand-ins where they are missing."""
    installed = []
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:
        from afa.models.mix_transformer import DropPath

        layers = types.ModuleType("timm.models.layers")
        layers.DropPath = DropPath
        layers.trunc_normal_ = nn.init.trunc_normal_
        layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
        timm = types.ModuleType("timm")
        timm.models = types.ModuleType("timm.models")
        timm.models.layers = layers
        sys.modules.update({"timm": timm, "timm.models": timm.models,
                            "timm.models.layers": layers})
        installed.append("timm.models.layers (DropPath, to_2tuple, trunc_normal_)")
    try:
        import mmcv.cnn  # noqa: F401
    except ImportError:
        class ConvModule(nn.Module):
            """1x1/kxk convolution without bias, BatchNorm, ReLU (mmcv's with a norm_cfg)."""

            def __init__(self, in_channels, out_channels, kernel_size, norm_cfg=None, **_):
                super().__init__()
                self.conv = nn.Conv2d(in_channels, out_channels, kernel_size,
                                      padding=kernel_size // 2, bias=norm_cfg is None)
                self.bn = nn.BatchNorm2d(out_channels) if norm_cfg else nn.Identity()
                self.activate = nn.ReLU(inplace=True)

            def forward(self, x):
                return self.activate(self.bn(self.conv(x)))

        mmcv = types.ModuleType("mmcv")
        mmcv.cnn = types.ModuleType("mmcv.cnn")
        mmcv.cnn.ConvModule = ConvModule
        sys.modules.update({"mmcv": mmcv, "mmcv.cnn": mmcv.cnn})
        installed.append("mmcv.cnn.ConvModule (conv, BatchNorm, ReLU)")
    return installed


class AuthorsIteration:
    """Their model, PAR, optimizer and loop body, set up as their VOC script does."""

    def __init__(self, repo: Path, backbone: str, crop: int, batch: int, device: torch.device):
        sys.path.insert(0, str(repo))
        from omegaconf import OmegaConf
        from utils import camutils, imutils, losses
        from utils.optimizer import PolyWarmupAdamW
        from wetr.model_attn_aff import WeTr
        from wetr.PAR import PAR as TheirPAR

        self.camutils, self.imutils, self.losses = camutils, imutils, losses
        self.cfg = OmegaConf.load(repo / "configs" / "voc_attn_reg.yaml")
        self.cfg.dataset.crop_size = crop
        self.device = device
        self.model = WeTr(backbone=backbone, stride=list(self.cfg.backbone.stride),
                          num_classes=self.cfg.dataset.num_classes, embedding_dim=256,
                          pretrained=False, pooling="gmp").to(device).train()
        self.par = TheirPAR(num_iter=10, dilations=[1, 2, 4, 8, 12, 24]).to(device)
        groups = self.model.get_param_groups()
        lr, wd = self.cfg.optimizer.learning_rate, self.cfg.optimizer.weight_decay
        self.optimizer = PolyWarmupAdamW(
            params=[{"params": groups[0], "lr": lr, "weight_decay": wd},
                    {"params": groups[1], "lr": 0.0, "weight_decay": 0.0},
                    {"params": groups[2], "lr": lr * 10, "weight_decay": wd},
                    {"params": groups[3], "lr": lr * 10, "weight_decay": wd}],
            lr=lr, weight_decay=wd, betas=self.cfg.optimizer.betas,
            warmup_iter=self.cfg.scheduler.warmup_iter, max_iter=self.cfg.train.max_iters,
            warmup_ratio=self.cfg.scheduler.warmup_ratio, power=self.cfg.scheduler.power)
        self.optimizer.global_step = 6001  # past the warm-up, as at the timed iteration
        # Their get_mask_by_radius (in their training script, which imports their dataset code and
        # an old numpy API) builds this (N, N) 0/1 float array: Chebyshev distance <= radius.
        def mask(side: int):
            return radius_mask(side, side, 8).numpy().astype("float64")

        self.mask = mask(crop // 16)
        infer = int((crop * max(self.cfg.cam.scales)) // 16)
        self.mask_infer = mask(infer)
        self.infer_size = infer
        self.bkg_cls = torch.ones(size=(batch, 1))

    def __call__(self, batch: dict) -> None:
        """One iteration of their loop after iteration 6000, without the logging."""
        cfg, cu, device = self.cfg, self.camutils, self.device
        inputs = batch["image"].to(device)
        img_box = batch["box"]
        inputs_denorm = self.imutils.denormalize_img2(inputs.clone())
        cls_labels = batch["label"].to(device)
        cls, segs, attns, attn_pred = self.model(inputs, seg_detach=False)
        cams, aff_mat = cu.multi_scale_cam_with_aff_mat(self.model, inputs=inputs,
                                                        scales=cfg.cam.scales)
        valid_cam, pseudo_label = cu.cam_to_label(cams.detach(), cls_label=cls_labels,
                                                  img_box=img_box, ignore_mid=True, cfg=cfg)
        resized = F.interpolate(valid_cam, size=(self.infer_size, self.infer_size),
                                mode="bilinear", align_corners=False)
        walked = []
        for bkg_score in (cfg.cam.low_thre, cfg.cam.high_thre):
            aff_cam = cu.propagte_aff_cam_with_bkg(resized, aff=aff_mat.detach().clone(),
                                                   mask=self.mask_infer, cls_labels=cls_labels,
                                                   bkg_score=bkg_score)
            walked.append(F.interpolate(aff_cam, size=pseudo_label.shape[1:], mode="bilinear",
                                        align_corners=False))
        labels_bkg = torch.cat((self.bkg_cls.to(cams.device), cls_labels), dim=1)
        refined_l, refined_h = (
            cu.refine_cams_with_cls_label(self.par, inputs_denorm, cams=w, labels=labels_bkg,
                                          img_box=img_box).argmax(dim=1) for w in walked)
        aff_label = refined_h.clone()
        aff_label[refined_h == 0] = cfg.dataset.ignore_index
        aff_label[(refined_h + refined_l) == 0] = 0
        aff_label = cu.ignore_img_box(aff_label, img_box=img_box,
                                      ignore_index=cfg.dataset.ignore_index)
        refined_pseudo = cu.refine_cams_with_bkg_v2(self.par, inputs_denorm, cams=cams,
                                                    cls_labels=cls_labels, cfg=cfg,
                                                    img_box=img_box)
        pair_label = cu.cams_to_affinity_label(refined_pseudo, mask=self.mask,
                                               ignore_index=cfg.dataset.ignore_index)
        aff_loss, _, _ = self.losses.get_aff_loss(attn_pred, pair_label)
        segs = F.interpolate(segs, size=refined_pseudo.shape[1:], mode="bilinear",
                             align_corners=False)
        seg_loss = self.losses.get_seg_loss(segs, aff_label.type(torch.long),
                                            ignore_index=cfg.dataset.ignore_index)
        cls_loss = F.multilabel_soft_margin_loss(cls, cls_labels)
        loss = cls_loss + 0.1 * seg_loss + 0.1 * aff_loss
        # Their loop reads the three losses back for its running averages every iteration.
        [t.item() for t in (cls_loss, seg_loss, aff_loss)]
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


class OurIteration:
    def __init__(self, backbone: str, crop: int, batch: int, device: torch.device, overrides,
                 amp: str = "none"):
        cfg = C.load_config(None, ["model.pretrained=null", f"model.backbone={backbone}",
                                   "loss.reg_loss=false", *overrides])
        self.model = AFANet(**C.model_kwargs(cfg)).to(device).train()
        self.optimizer = build_optimizer(self.model.param_groups(), cfg.optim.lr,
                                         cfg.optim.weight_decay, lr_mults=C.lr_mults(cfg))
        self.phase = Schedule.from_config(cfg).phase(max(cfg.train.cam_iters,
                                                         cfg.train.aff_switch_iter))
        self.settings = StepSettings.from_config(cfg, amp)
        self.kwargs = dict(device=device, par=PAR(**C.par_kwargs(cfg)).to(device), crf_loss=None)

    def __call__(self, batch: dict) -> None:
        step = train_step(self.model, batch, self.phase, self.settings, **self.kwargs)
        step.terms.total.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(run, snapshot, batch, device) -> float:
    run.model.load_state_dict(snapshot[0])
    run.optimizer.load_state_dict(snapshot[1])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--authors-repo", required=True, type=Path,
                   help="a checkout of github.com/rulixiang/afa")
    p.add_argument("--backbone", default="mit_b1")
    p.add_argument("--crop", type=int, default=320)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--rounds", type=int, default=3, help="timed iterations of each, alternating")
    p.add_argument("--amp", default="none", choices=("none", "bf16"),
                   help="our forwards' precision (train.amp); theirs stay float32")
    p.add_argument("--only", choices=("ours", "authors"),
                   help="time one implementation in this process (run the script once per "
                        "implementation, e.g. each with its own AFA_KEEP_HOST_MEMORY)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of our config (e.g. cam.update_decoder_bn=false)")
    args = p.parse_args(argv)
    if not (args.authors_repo / "wetr" / "model_attn_aff.py").is_file():
        p.error(f"{args.authors_repo} is not a checkout of github.com/rulixiang/afa "
                "(no wetr/model_attn_aff.py)")
    torch.set_num_threads(args.threads)
    host_memory = keep_freed_host_memory()  # for both: AFA_KEEP_HOST_MEMORY=0 leaves glibc's own
    device = torch.device(args.device)
    stand_ins = _install_stand_ins()
    torch.manual_seed(0)
    batch = random_batch(args.batch, args.crop)
    runs = {}
    if args.only in (None, "ours"):
        runs["ours"] = OurIteration(args.backbone, args.crop, args.batch, device, args.overrides,
                                    args.amp)
    if args.only in (None, "authors"):
        runs["authors"] = AuthorsIteration(args.authors_repo, args.backbone, args.crop,
                                           args.batch, device)
    snapshots = {}
    for name, run in runs.items():  # warm-up, then the state every timed iteration starts from
        run(batch)
        snapshots[name] = copy.deepcopy((run.model.state_dict(), run.optimizer.state_dict()))
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(timed(run, snapshots[name], batch, device))
    result = {name: {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3),
                     "all_s": [round(x, 3) for x in t]} for name, t in times.items()}
    if len(runs) == 2:
        result["ratio_median"] = round(result["ours"]["median_s"] / result["authors"]["median_s"],
                                       3)
        result["ratio_min"] = round(result["ours"]["min_s"] / result["authors"]["min_s"], 3)
    result.update(backbone=args.backbone, crop=args.crop, batch=args.batch, threads=args.threads,
                  amp=args.amp, host_memory=host_memory,
                  device=args.device, overrides=args.overrides, stand_ins=stand_ins)
    for name in runs:
        print(f"{name:8s} median {result[name]['median_s']:.3f} s  min {result[name]['min_s']:.3f}"
              f" s  ({', '.join(f'{x:.3f}' for x in times[name])})")
    if len(runs) == 2:
        print(f"ours / authors: {result['ratio_median']:.3f} (medians), "
              f"{result['ratio_min']:.3f} (minima)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
