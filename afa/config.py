"""The configuration: typed defaults, one merge order, and the mapping onto plain arguments.

Merge order (the only one): the defaults below -> the YAML file -> ``key=value`` overrides from the
command line. Unknown keys and values of the wrong type are errors that name the key. The merged
config is saved into the work dir as ``config.yaml``. Modules never read the config: functions in
this file (``*_kwargs``) turn its sections into keyword arguments.

The defaults are the paper's VOC setting (docs/method.md, steps 1-12 and 'Schedule');
``configs/*.yaml`` override what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from afa.constants import CLASS_NAME_SETS

__all__ = ["Config", "ConfigError", "config_warnings", "load_config", "save_config"]


@dataclass
class ModelConfig:
    backbone: str = "mit_b1"  # mit_b0 .. mit_b5
    # The ImageNet MiT weights of the backbone (pretrained/README.md says where to get them);
    # null: train from scratch (see the README: the paper's frozen norms and 10x heads then need
    # optim.lr_mults changed, as configs/demo.yaml does).
    pretrained: Optional[str] = "pretrained/${model.backbone}.pth"
    pooling: str = "gmp"  # gmp (AFA) | gap
    stride: list[int] = field(default_factory=lambda: [4, 2, 2, 1])
    embedding_dim: int = 256
    drop_path_rate: float = 0.1


@dataclass
class DataConfig:
    name: str = "voc"  # voc | coco | demo: picks class names for logs and tables
    root: str = "data/VOCdevkit/VOC2012"  # holds JPEGImages/ and the mask folder
    list_dir: str = "data/voc"  # holds <split>.txt and cls_labels.json (tools/prepare_voc.py)
    mask_dir: str = "SegmentationClassAug"
    split_subdirs: bool = False  # COCO layout: JPEGImages/<split>/, <mask_dir>/<split>/
    train_split: str = "train_aug"
    val_split: str = "val"
    num_classes: int = 21  # with background
    crop_size: int = 512
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    num_workers: int = 4
    # false: a missing, corrupt or mis-sized file stops the run (after a checkpoint) naming it.
    # true: such files are left out, counted and listed in train.log; a training sample that
    # fails to decode is replaced by the next one, a validation image is left out of the scores.
    skip_bad: bool = False
    val_max_images: Optional[int] = None  # validate on the first N val images (quick checks)
    val_batch: int = 4  # validation runs up to this many images of equal size together


@dataclass
class LrMultConfig:
    """Learning-rate multiplier of each named parameter group of ``AFANet.param_groups``.

    AFA's: backbone 1, backbone LayerNorms 0 (frozen at their ImageNet values), the CAM
    classifier and affinity projection 10, the decoder 10. Training from scratch (the demo) wants
    1 everywhere: frozen unit norms and a 10x classifier keep MiT at chance for hundreds of steps.
    """
    backbone: float = 1.0
    backbone_norm: float = 0.0
    heads: float = 10.0
    decoder: float = 10.0


@dataclass
class OptimConfig:
    lr: float = 6e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    # null (the paper): one schedule, warm-up then polynomial decay to 0 at train.max_iters. Set:
    # the classification-only phase decays to 0 at train.cam_iters, and the joint phase restarts
    # at this rate and decays to 0 at max_iters (no warm-up), so the decoder and affinity head,
    # which start learning at cam_iters, do not start at a tenth of the peak (configs/demo_full.yaml).
    joint_lr: Optional[float] = None
    lr_mults: LrMultConfig = field(default_factory=LrMultConfig)


@dataclass
class TrainConfig:
    max_iters: int = 20000
    global_batch: int = 4  # kept on any number of GPUs by gradient accumulation
    # Images per process and micro-batch; null: global_batch / processes (one micro-batch per
    # step). A smaller value accumulates gradients, e.g. 2 on one GPU gives the paper's 2 x 2.
    batch_per_gpu: Optional[int] = None
    cam_iters: int = 2000  # classification loss only before this iteration
    # Before cam_iters, also run the decoder and affinity head (the paper; their losses have
    # weight 0 but the decoder's BatchNorm statistics update). false: encoder + classifier only,
    # 0.19 instead of 0.30 s per classification-phase step of the demo, which uses it.
    cls_phase_full_forward: bool = True
    # null (the paper): model.stride throughout. Set (e.g. [4, 2, 2, 1]): the encoder runs at
    # these strides before cam_iters, at model.stride from cam_iters on (the weights are the same;
    # only the patch embeddings' convolution strides change). A classification-only phase at
    # stride 16, then a joint phase at stride 8 for a finer affinity grid: configs/demo_full.yaml.
    cls_phase_stride: Optional[list[int]] = None
    aff_switch_iter: int = 6000  # segmentation target: refined label before, affinity label after
    eval_iters: int = 2000
    log_iters: int = 50
    ckpt_iters: int = 2000
    keep_last: int = 3
    # Mixed precision of the network's forwards: none | bf16 (CUDA, and CPUs with bfloat16
    # support) | fp16 (CUDA only, with a gradient scaler) | auto (bf16 where the device computes
    # it natively, else none; afa.engine.precision.resolve_amp). Pseudo labels and losses stay fp32.
    amp: str = "none"
    # CUDA: let fp32 matmuls and convolutions use TF32 tensor cores (10-bit mantissa
    # products; not yet measured here). false: strict fp32. No effect on CPU.
    tf32: bool = True
    # What a non-finite loss or gradient does. Either way the step is dropped on the device
    # (no weight, optimizer state or BatchNorm statistic changes) and found at the next log
    # interval (train.log_iters; the one host-device sync of the loop): stop (then, after a
    # checkpoint) | skip (go on; counted in the log).
    nonfinite: str = "stop"
    image_log_iters: int = 2000  # TensorBoard image grids


@dataclass
class CamConfig:
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5])
    bkg_score: float = 0.45
    high: float = 0.55
    low: float = 0.35
    radius: int = 8
    ignore_index: int = 255
    # true: the un-flipped scale-1 CAM and its affinity come from the training forward instead of
    # a second forward (the paper runs it again). Identical when the backbone is deterministic in
    # training (model.drop_path_rate: 0); with drop-path the reused CAM carries its noise.
    reuse_train_forward: bool = False
    # true (the authors' code): every multi-scale CAM forward, each scale with its flip and every
    # iteration, also runs the decoder in train mode, so its BatchNorm running statistics (what
    # validation and inference use) are updated 1 + len(scales) times per iteration. false: the
    # CAM forwards skip the decoder and only the training forward updates them (cheaper; the
    # classification phase then needs no CAM forwards at all). Not with reuse_train_forward.
    update_decoder_bn: bool = True


@dataclass
class ParConfig:
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    num_iter: int = 10
    w1: float = 0.3
    w2: float = 0.3
    w3: float = 0.01


@dataclass
class LossConfig:
    w_seg: float = 0.1
    w_aff: float = 0.1
    reg_loss: bool = True  # the regularized DenseCRF loss of the paper's 66.0 run
    # true (not in the paper): the affinity loss averages background-background and
    # foreground-foreground positive pairs separately. With small objects the background's
    # pairs outnumber the objects' so far that the head learns "affinity = both background"
    # (the demo continued at stage-4 stride 8: same-class affinity 0.95 for background,
    # 0.003-0.39 for its shapes; logs/demo_probes_20261130/e2.log).
    aff_balance: bool = False
    w_reg: float = 0.01
    reg_rgb_sigma: float = 15.0
    reg_xy_sigma: float = 100.0
    reg_scale: float = 0.5  # the loss works on images downsampled by this factor
    # Processes that run the regularized loss's bilateral filter (CPU) while the multi-scale CAM
    # and pseudo labels are computed. null: one per image of the micro-batch (at most the CPUs
    # this process may use, less one) on CUDA, none on CPU (whose cores are busy anyway); 0: in
    # the training process. The numbers are the same either way.
    reg_workers: Optional[int] = None


@dataclass
class InferConfig:
    long_side: int = 512
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.75])
    flip: bool = True
    crf_iters: int = 10
    crf_gauss_sxy: float = 3.0
    crf_gauss_compat: float = 3.0
    crf_bilateral_sxy: float = 64.0
    crf_bilateral_srgb: float = 5.0
    crf_bilateral_compat: float = 4.0


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    work_dir: str = "work_dirs/voc"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    par: ParConfig = field(default_factory=ParConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    infer: InferConfig = field(default_factory=InferConfig)


_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "model.backbone": tuple(f"mit_b{i}" for i in range(6)),
    "model.pooling": ("gmp", "gap"),
    "data.name": ("voc", "coco", "demo"),
    "train.amp": ("none", "bf16", "fp16", "auto"),
    "train.nonfinite": ("stop", "skip"),
}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


# Bounds of numeric settings: key -> (least, greatest, whether the least is excluded). A value out
# of them would crash deep inside a run or train nothing; None (where allowed) is not checked.
_RANGES = {
    "seed": (0, None, False),
    "model.embedding_dim": (1, None, False),
    "model.drop_path_rate": (0, 1, False),
    "data.crop_size": (16, None, False),  # one stage-4 token at stride 16
    "data.num_workers": (0, None, False),
    "data.val_max_images": (1, None, False),
    "data.val_batch": (1, None, False),
    "optim.lr": (0, None, True),
    "optim.weight_decay": (0, None, False),
    "optim.warmup_iters": (0, None, False),
    "optim.warmup_ratio": (0, 1, False),
    "optim.power": (0, None, False),
    "optim.lr_mults.backbone": (0, None, False),
    "optim.lr_mults.backbone_norm": (0, None, False),
    "optim.lr_mults.heads": (0, None, False),
    "optim.lr_mults.decoder": (0, None, False),
    "train.max_iters": (1, None, False),
    "train.global_batch": (1, None, False),
    "train.cam_iters": (0, None, False),
    "train.aff_switch_iter": (0, None, False),
    "train.eval_iters": (1, None, False),
    "train.log_iters": (1, None, False),
    "train.ckpt_iters": (1, None, False),
    "train.keep_last": (0, None, False),  # 0 keeps every checkpoint
    "train.image_log_iters": (0, None, False),  # 0: no image grids
    "cam.bkg_score": (0, 1, False),
    "cam.high": (0, 1, False),
    "cam.low": (0, 1, False),
    "cam.radius": (1, None, False),
    "cam.ignore_index": (0, 255, False),  # masks are 8-bit PNGs
    "par.num_iter": (0, None, False),
    "par.w1": (0, None, True),
    "par.w2": (0, None, True),
    "par.w3": (0, None, False),
    "loss.w_seg": (0, None, False),
    "loss.w_aff": (0, None, False),
    "loss.w_reg": (0, None, False),
    "loss.reg_rgb_sigma": (0, None, True),
    "loss.reg_xy_sigma": (0, None, True),
    "loss.reg_scale": (0, 1, True),
    "loss.reg_workers": (0, None, False),
    "infer.long_side": (16, None, False),
    "infer.crf_iters": (0, None, False),
    "infer.crf_gauss_sxy": (0, None, True),
    "infer.crf_bilateral_sxy": (0, None, True),
    "infer.crf_bilateral_srgb": (0, None, True),
}
# Lists whose every element must be positive, and the least length.
_POSITIVE_LISTS = {"data.scale_range": 2, "cam.scales": 1, "par.dilations": 1, "infer.scales": 1,
                   "optim.betas": 2}


def _check_ranges(cfg: DictConfig) -> None:
    """One-line ConfigErrors for values no run can use (see ``_RANGES``)."""
    for key, (least, greatest, open_below) in _RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        too_low = value <= least if open_below else value < least
        if too_low or (greatest is not None and value > greatest):
            bound = (f"> {least}" if open_below else f">= {least}") + (
                f" and <= {greatest}" if greatest is not None else "")
            raise ConfigError(f"'{key}' must be {bound}, got {value}")
    for key, length in _POSITIVE_LISTS.items():
        value = list(OmegaConf.select(cfg, key))
        if len(value) < length or min(value) <= 0:
            raise ConfigError(f"'{key}' must hold at least {length} positive values, got {value}")
    if len(cfg.data.scale_range) != 2 or cfg.data.scale_range[0] > cfg.data.scale_range[1]:
        raise ConfigError(f"'data.scale_range' must be [low, high] with low <= high, got "
                          f"{list(cfg.data.scale_range)}")
    if max(cfg.optim.betas) >= 1 or len(cfg.optim.betas) != 2:
        raise ConfigError(f"'optim.betas' must be two values in (0, 1), got "
                          f"{list(cfg.optim.betas)}")
    if not cfg.cam.low <= cfg.cam.high:
        raise ConfigError(f"'cam.low' ({cfg.cam.low}) must not exceed 'cam.high' "
                          f"({cfg.cam.high}): low marks sure background, high sure foreground")


def config_warnings(cfg: DictConfig) -> list[str]:
    """Settings that run but are probably not what was meant (the trainer logs them)."""
    o, t = cfg.optim, cfg.train
    found = []
    # With optim.joint_lr the first schedule ends at cam_iters (see the trainer's _lr_at).
    schedule_end = t.max_iters if o.joint_lr is None else t.cam_iters
    if o.warmup_iters >= schedule_end:
        from afa.engine.optim import lr_at

        peak = lr_at(schedule_end - 1, o.lr, schedule_end, o.warmup_iters, o.warmup_ratio)
        end = "train.max_iters" if o.joint_lr is None else "train.cam_iters"
        found.append(f"optim.warmup_iters={o.warmup_iters} is not below {end}={schedule_end}: "
                     f"the learning rate stays in warm-up for the whole schedule and peaks at "
                     f"{peak:.3g} instead of optim.lr={o.lr:g}; lower optim.warmup_iters for a "
                     "short run")
    if t.cam_iters >= t.max_iters:
        found.append(f"train.cam_iters={t.cam_iters} is not below train.max_iters="
                     f"{t.max_iters}: only the classification loss is trained (no pseudo "
                     "labels, segmentation or affinity)")
    return found


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> DictConfig:
    """Defaults -> YAML ``path`` -> ``overrides`` (``["train.max_iters=10", ...]``)."""
    cfg = OmegaConf.structured(Config)
    sources = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: '{path}'")
        sources.append((str(path), OmegaConf.load(path)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"Overrides must look like key=value, got '{bad[0]}'")
        sources.append(("the command line", OmegaConf.from_dotlist(list(overrides))))
    for where, source in sources:
        try:
            cfg = OmegaConf.merge(cfg, source)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            raise ConfigError(f"Bad config key '{key}' in {where}: {str(err.msg).splitlines()[0]}") from None
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"'{key}' must be one of {allowed}, got '{value}'")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:  # e.g. a ${...} that names no key
        raise ConfigError(f"Bad config value: {str(err).splitlines()[0]}") from None
    if cfg.cam.update_decoder_bn and cfg.cam.reuse_train_forward:
        raise ConfigError("'cam.update_decoder_bn' and 'cam.reuse_train_forward' exclude each "
                          "other: the reused forward's decoder saw no flipped copy; set one false")
    _check_ranges(cfg)
    names = CLASS_NAME_SETS[cfg.data.name]
    if cfg.data.num_classes != len(names):
        raise ConfigError(f"'data.num_classes' is {cfg.data.num_classes}, but data.name="
                          f"{cfg.data.name} has {len(names)} classes (background included): "
                          f"drop the override or set data.num_classes={len(names)}")
    for key in ("model.stride", "train.cls_phase_stride"):
        value = OmegaConf.select(cfg, key)
        if value is not None and (len(value) != 4 or min(value) < 1):
            raise ConfigError(f"'{key}' must be four strides >= 1 (one per stage), got "
                              f"{list(value)}")
    if cfg.optim.joint_lr is not None and not (
            cfg.optim.joint_lr > 0 and 0 < cfg.train.cam_iters < cfg.train.max_iters):
        raise ConfigError(f"'optim.joint_lr' ({cfg.optim.joint_lr}) must be > 0 and needs a "
                          f"classification phase and a joint phase (0 < train.cam_iters "
                          f"({cfg.train.cam_iters}) < train.max_iters ({cfg.train.max_iters}))")
    batch = cfg.train.batch_per_gpu
    if batch is not None and (batch < 1 or cfg.train.global_batch % batch):
        raise ConfigError(f"'train.global_batch' ({cfg.train.global_batch}) must be a multiple of "
                          f"'train.batch_per_gpu' ({cfg.train.batch_per_gpu})")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(cfg))


def model_kwargs(cfg: DictConfig) -> dict:
    m = cfg.model
    return dict(backbone=m.backbone, num_classes=cfg.data.num_classes,
                embedding_dim=m.embedding_dim, stride=tuple(m.stride), pooling=m.pooling,
                pretrained=m.pretrained, drop_path_rate=m.drop_path_rate)


def lr_mults(cfg: DictConfig) -> dict:
    """``{group name: multiplier}`` for ``afa.engine.optim.build_optimizer``."""
    return dict(OmegaConf.to_container(cfg.optim.lr_mults))


def par_kwargs(cfg: DictConfig) -> dict:
    p = cfg.par
    return dict(dilations=tuple(p.dilations), num_iter=p.num_iter, w1=p.w1, w2=p.w2, w3=p.w3)


def crf_kwargs(cfg: DictConfig) -> dict:
    """``afa.crf.dense_crf`` keyword arguments from ``cfg.infer``."""
    i = cfg.infer
    return dict(iterations=i.crf_iters, gaussian_sxy=i.crf_gauss_sxy,
                gaussian_compat=i.crf_gauss_compat, bilateral_sxy=i.crf_bilateral_sxy,
                bilateral_srgb=i.crf_bilateral_srgb, bilateral_compat=i.crf_bilateral_compat)


def image_set_kwargs(cfg: DictConfig, split: str) -> dict:
    """``afa.inference.ImageSet`` keyword arguments for ``split`` of ``cfg.data``."""
    d = cfg.data
    return dict(root=d.root, name_list=Path(d.list_dir) / f"{split}.txt",
                num_classes=d.num_classes, mask_dir=d.mask_dir,
                split_subdir=split if d.split_subdirs else None,
                label_file=Path(d.list_dir) / "cls_labels.json")
