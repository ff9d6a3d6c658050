"""The configuration: typed defaults, one merge order, and the mapping onto plain arguments.

Merge order (the only one): the defaults below -> the YAML file -> ``key=value`` overrides from the
command line. Unknown keys and values of the wrong type or range are errors that name the key. The
merged config is saved into the work dir as ``config.yaml``. Modules never read the config:
functions in this file (``*_kwargs``, :func:`thresholds`, ...) turn its sections into arguments.

The defaults are the paper's VOC setting (docs/method.md, steps 1-12 and 'Schedule');
``configs/*.yaml`` override what differs. A key exists because a user turns it; the method's
fixed constants (PAR's kernel weights, the regularized loss's kernel widths, AdamW's betas, the
dense CRF of inference) are the defaults of the functions that use them. The demos' departures
from the paper (a lean classification phase, other strides and learning rate per phase, the
balanced affinity loss, from-scratch learning-rate multipliers) are keys too, each off by default
and documented where it is defined; ``afa.engine.schedule`` turns the phase-related ones into one
value per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from afa.constants import CLASS_NAME_SETS, CamThresholds

__all__ = ["CLASS_LIST_FILE", "CamThresholds", "Config", "ConfigError", "class_names",
           "config_warnings", "load_config", "num_classes", "read_class_list", "save_config",
           "thresholds", "upgrade_saved_config"]


@dataclass
class ModelConfig:
    backbone: str = "mit_b1"  # mit_b0 .. mit_b5
    # The ImageNet MiT weights of the backbone (pretrained/README.md says where to get them);
    # null: train from scratch (then optim.lr_mults wants changing, as configs/demo.yaml does).
    pretrained: Optional[str] = "pretrained/${model.backbone}.pth"
    pooling: str = "gmp"  # gmp (AFA) | gap: how the classifier pools the stage-4 features
    stride: list[int] = field(default_factory=lambda: [4, 2, 2, 1])  # of the four stages
    embedding_dim: int = 256  # decoder width
    drop_path_rate: float = 0.1


@dataclass
class DataConfig:
    # voc | coco | demo: their fixed class names (and so their number); custom: your own images
    # with tags (tools/prepare_tags.py), whose class names are data.classes.
    name: str = "voc"
    # custom only: the class names, background first. null: read from <list_dir>/classes.txt,
    # which tools/prepare_tags.py writes; a checkpoint carries them, so its tools need neither.
    classes: Optional[list[str]] = None
    root: str = "data/VOCdevkit/VOC2012"  # holds JPEGImages/ and the mask folder
    list_dir: str = "data/voc"  # holds <split>.txt and cls_labels.json (tools/prepare_voc.py)
    mask_dir: str = "SegmentationClassAug"
    split_subdirs: bool = False  # COCO layout: JPEGImages/<split>/, <mask_dir>/<split>/
    train_split: str = "train_aug"
    val_split: str = "val"
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
    classifier and affinity projection 10, the decoder 10. Training from scratch (the demos) wants
    1 everywhere but the decoder: frozen unit norms and a 10x classifier keep MiT at chance for
    hundreds of steps.
    """
    backbone: float = 1.0
    backbone_norm: float = 0.0
    heads: float = 10.0
    decoder: float = 10.0


@dataclass
class OptimConfig:
    lr: float = 6e-5  # AdamW, betas (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_iters: int = 1500  # linear from 1e-6 x lr, then poly decay (power 1) to max_iters
    # null (the paper): one schedule over the run. Set (configs/demo_full.yaml): the
    # classification phase decays to 0 at train.cam_iters, and the joint phase restarts at this
    # rate and decays to 0 at max_iters without warm-up, so that the decoder and affinity head,
    # which start learning at cam_iters, do not start at a tenth of the peak.
    joint_lr: Optional[float] = None
    lr_mults: LrMultConfig = field(default_factory=LrMultConfig)


@dataclass
class TrainConfig:
    max_iters: int = 20000
    global_batch: int = 4  # kept on any number of GPUs by gradient accumulation
    # Images per process and micro-batch; null: global_batch / processes (one micro-batch per
    # step). A smaller value accumulates gradients, e.g. 2 on one GPU gives the paper's 2 x 2.
    batch_per_gpu: Optional[int] = None
    cam_iters: int = 2000  # the classification loss alone before this iteration
    aff_switch_iter: int = 6000  # segmentation target: refined label before, affinity label after
    # false (the paper, and the authors' code): every iteration runs the whole network, the
    # multi-scale CAM runs all its forwards and they update the decoder's BatchNorm statistics.
    # true (the demos): skip what the paper computes and then discards, on 2-core budgets:
    # before cam_iters the training forward runs the encoder and classifier only and no CAM is
    # made; the multi-scale CAM takes its un-flipped scale-1 copy from the training forward
    # (identical without drop-path); its forwards leave the decoder's BatchNorm statistics to
    # the training forward. The last changes what validation and inference use (docs/demo.md).
    lean_forwards: bool = False
    # null (the paper): model.stride throughout. Set (configs/demo_full.yaml: [4, 2, 2, 1] with
    # model.stride [4, 2, 1, 1]): these strides before cam_iters, model.stride from then on (the
    # weights are the same; the patch embeddings' strides change), for a finer affinity grid in
    # the joint phase than the classification phase pays for.
    cls_phase_stride: Optional[list[int]] = None
    eval_iters: int = 2000
    # null (the paper): every validation scores the whole val split. N: the periodic ones score
    # a fixed subset of N images spread evenly over the split (every k-th), and the validation
    # of the last iteration scores the whole split; configs/coco.yaml, whose 40,137 val images
    # would otherwise take about three quarters of the training's time (docs/BENCHMARKS.md).
    # best.pth follows the subset's scores, then the final full pass's.
    eval_subset: Optional[int] = None
    log_iters: int = 50
    ckpt_iters: int = 2000
    keep_last: int = 3  # iteration checkpoints kept besides best.pth; 0 keeps them all
    # Mixed precision of the network's forwards: none | bf16 (CUDA, and CPUs with bfloat16
    # support) | fp16 (CUDA only, with a gradient scaler) | auto (bf16 where the device computes
    # it natively, else none; afa.engine.precision.resolve_amp). Pseudo labels and losses stay fp32.
    amp: str = "none"
    # CUDA: let fp32 matmuls and convolutions use TF32 tensor cores. false: strict fp32.
    tf32: bool = True
    # What a non-finite loss or gradient does. Either way the step is dropped on the device
    # (no weight, optimizer state or BatchNorm statistic changes) and found at the next log
    # interval (train.log_iters; the one host-device sync of the loop): stop (then, after a
    # checkpoint) | skip (go on; counted in the log).
    nonfinite: str = "stop"
    image_log_iters: int = 2000  # TensorBoard image grids; 0: none


@dataclass
class ThresholdConfig:
    """The CAM background scores (the authors' config: bkg_score, high_thre, low_thre)."""
    background: float = 0.45  # the CAM label's background score (validation, evaluation)
    # A pixel is background in a pseudo label if both bands say so, foreground if both say so,
    # and ignored where they disagree: high and low are the two background scores.
    high: float = 0.55
    low: float = 0.35


@dataclass
class CamConfig:
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5])
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    radius: int = 8  # Chebyshev radius of the affinity on the stage-4 grid


@dataclass
class ParConfig:
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    num_iter: int = 10  # COCO: 15


@dataclass
class LossConfig:
    w_seg: float = 0.1
    w_aff: float = 0.1
    # The regularized (DenseCRF) loss of the paper's 66.0 run: bilateral kernel RGB sigma 15,
    # xy sigma 100, at half resolution (afa.losses.DenseCRFLoss), this weight.
    reg_loss: bool = True
    w_reg: float = 0.01
    # Processes that run the regularized loss's bilateral filter (CPU) while the multi-scale CAM
    # and pseudo labels are computed. null: one per image of the micro-batch (at most the CPUs
    # this process may use, less one) on CUDA, none on CPU (whose cores are busy anyway); 0: in
    # the training process. The numbers are the same either way.
    reg_workers: Optional[int] = None
    # Where the bilateral filter runs: "pydensecrf" (CPU worker processes, the reference),
    # "torch" (afa.permutohedral: the same lattice in PyTorch on the training device, equal to
    # pydensecrf2's to float rounding), "auto": torch on CUDA, pydensecrf on the CPU, where it is
    # the faster (docs/BENCHMARKS.md). The choice is written to train.log.
    reg_backend: str = "auto"
    # true (not in the paper; configs/demo_full.yaml): the affinity loss averages
    # background-background and foreground-foreground positive pairs separately. With small
    # objects the background's pairs outnumber the objects' so far that the head learns
    # "affinity = both background" (docs/demo.md).
    aff_balance: bool = False


@dataclass
class InferConfig:
    long_side: int = 512
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.75])
    flip: bool = True


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
    "data.name": (*CLASS_NAME_SETS, "custom"),
    "train.amp": ("none", "bf16", "fp16", "auto"),
    "train.nonfinite": ("stop", "skip"),
    "loss.reg_backend": ("auto", "torch", "pydensecrf"),
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
    "optim.lr_mults.backbone": (0, None, False),
    "optim.lr_mults.backbone_norm": (0, None, False),
    "optim.lr_mults.heads": (0, None, False),
    "optim.lr_mults.decoder": (0, None, False),
    "train.max_iters": (1, None, False),
    "train.global_batch": (1, None, False),
    "train.cam_iters": (0, None, False),
    "train.aff_switch_iter": (0, None, False),
    "train.eval_iters": (1, None, False),
    "train.eval_subset": (1, None, False),
    "train.log_iters": (1, None, False),
    "train.ckpt_iters": (1, None, False),
    "train.keep_last": (0, None, False),
    "train.image_log_iters": (0, None, False),
    "cam.thresholds.background": (0, 1, False),
    "cam.thresholds.high": (0, 1, False),
    "cam.thresholds.low": (0, 1, False),
    "cam.radius": (1, None, False),
    "par.num_iter": (0, None, False),
    "loss.w_seg": (0, None, False),
    "loss.w_aff": (0, None, False),
    "loss.w_reg": (0, None, False),
    "loss.reg_workers": (0, None, False),
    "infer.long_side": (16, None, False),
}
# Lists whose every element must be positive, and their least length.
_POSITIVE_LISTS = {"data.scale_range": 2, "cam.scales": 1, "par.dilations": 1, "infer.scales": 1}


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
    th = cfg.cam.thresholds
    if not th.low <= th.high:
        raise ConfigError(f"'cam.thresholds.low' ({th.low}) must not exceed "
                          f"'cam.thresholds.high' ({th.high}): low marks sure background, high "
                          "sure foreground")
    for key in ("model.stride", "train.cls_phase_stride"):
        value = OmegaConf.select(cfg, key)
        if value is not None and (len(value) != 4 or min(value) < 1):
            raise ConfigError(f"'{key}' must be four strides >= 1 (one per stage), got "
                              f"{list(value)}")
    o, t = cfg.optim, cfg.train
    if o.joint_lr is not None and not (o.joint_lr > 0 and 0 < t.cam_iters < t.max_iters):
        raise ConfigError(f"'optim.joint_lr' ({o.joint_lr}) must be > 0 and needs a "
                          f"classification phase and a joint phase (0 < train.cam_iters "
                          f"({t.cam_iters}) < train.max_iters ({t.max_iters}))")
    if t.batch_per_gpu is not None and (t.batch_per_gpu < 1 or t.global_batch % t.batch_per_gpu):
        raise ConfigError(f"'train.global_batch' ({t.global_batch}) must be a multiple of "
                          f"'train.batch_per_gpu' ({t.batch_per_gpu})")


def config_warnings(cfg: DictConfig) -> list[str]:
    """Settings that run but are probably not what was meant (the trainer logs them)."""
    from afa.engine.optim import lr_at

    o, t = cfg.optim, cfg.train
    found = []
    # With optim.joint_lr the first schedule ends at cam_iters (afa.engine.schedule).
    schedule_end = t.max_iters if o.joint_lr is None else t.cam_iters
    if o.warmup_iters >= schedule_end:
        peak = lr_at(schedule_end - 1, o.lr, schedule_end, o.warmup_iters)
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
            hint = _RENAMED.get(key)
            raise ConfigError(f"Bad config key '{key}' in {where}: "
                              + (f"it is now {hint}" if hint else
                                 str(err.msg).splitlines()[0])) from None
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"'{key}' must be one of {allowed}, got '{value}'")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:  # e.g. a ${...} that names no key
        raise ConfigError(f"Bad config value: {str(err).splitlines()[0]}") from None
    _check_ranges(cfg)
    _resolve_classes(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(cfg))


# Keys of earlier versions: where each went, for the error a user's old config or command line
# meets, and for reading the config saved in an older checkpoint (upgrade_saved_config).
_RENAMED = {
    "cam.bkg_score": "cam.thresholds.background",
    "cam.high": "cam.thresholds.high",
    "cam.low": "cam.thresholds.low",
    "data.num_classes": "derived from data.name (drop it)",
    "cam.ignore_index": "always 255 (drop it)",
    "train.cls_phase_full_forward": "part of train.lean_forwards",
    "cam.reuse_train_forward": "part of train.lean_forwards",
    "cam.update_decoder_bn": "part of train.lean_forwards",
}
# Keys that became the fixed constants of the method, with their values: an old checkpoint
# that used these values continues; another value cannot be represented any more.
_FIXED = {"optim.betas": [0.9, 0.999], "optim.warmup_ratio": 1e-6, "optim.power": 1.0,
          "par.w1": 0.3, "par.w2": 0.3, "par.w3": 0.01, "loss.reg_rgb_sigma": 15.0,
          "loss.reg_xy_sigma": 100.0, "loss.reg_scale": 0.5, "cam.ignore_index": 255,
          "infer.crf_iters": 10, "infer.crf_gauss_sxy": 3.0, "infer.crf_gauss_compat": 3.0,
          "infer.crf_bilateral_sxy": 64.0, "infer.crf_bilateral_srgb": 5.0,
          "infer.crf_bilateral_compat": 4.0}
_LEAN = {"train.cls_phase_full_forward": False, "cam.reuse_train_forward": True,
         "cam.update_decoder_bn": False}


def upgrade_saved_config(saved: dict) -> dict:
    """The config saved in a checkpoint of an earlier version, in today's keys.

    Renamed keys move; fixed constants at their fixed value and the class count (derived from
    ``data.name``) are dropped; the three forward switches become ``train.lean_forwards`` when
    they agree. What cannot be expressed stays under its old key, so that a resumed run's
    config comparison names it.
    """
    import copy

    saved = copy.deepcopy(saved)

    def pop(key):
        section, name = key.rsplit(".", 1)
        node = saved
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            return True, node.pop(name)
        return False, None

    def put(key, value):
        node = saved
        *sections, name = key.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[name] = value

    if isinstance(saved.get("data"), dict):
        saved["data"].setdefault("classes", None)  # added later; built-in sets leave it null
    # Added later, with the value that means what earlier runs did.
    if isinstance(saved.get("train"), dict):
        saved["train"].setdefault("eval_subset", None)
    if isinstance(saved.get("loss"), dict):
        saved["loss"].setdefault("reg_backend", "auto")
    for old in ("cam.bkg_score", "cam.high", "cam.low"):
        found, value = pop(old)
        if found:
            put(_RENAMED[old], value)
    found, value = pop("data.num_classes")
    name = saved.get("data", {}).get("name")
    if found and name in CLASS_NAME_SETS and value != len(CLASS_NAME_SETS[name]):
        put("data.num_classes", value)  # not expressible: the comparison will name it
    for key, fixed in _FIXED.items():
        found, value = pop(key)
        if found and value != fixed:
            put(key, value)
    switches = {key: pop(key) for key in _LEAN}
    present = {key: value for key, (found, value) in switches.items() if found}
    if present:
        if present == _LEAN:
            put("train.lean_forwards", True)
        elif all(value != _LEAN[key] for key, value in present.items()):
            put("train.lean_forwards", False)
        else:
            for key, value in present.items():
                put(key, value)
    return saved


CLASS_LIST_FILE = "classes.txt"  # in data.list_dir: a custom set's class names, one per line


def read_class_list(path: str | Path) -> list[str]:
    """Class names from a text file, one per line (blank lines skipped), background first: a
    list without it gets "background" in front."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
             if line.strip()]
    if names[:1] != ["background"]:
        names.insert(0, "background")
    return names


def _resolve_classes(cfg: DictConfig) -> None:
    """``data.classes`` of a custom set from its list dir when not given; the built-in sets
    have fixed names, which ``data.classes`` may only repeat."""
    d = cfg.data
    if d.name != "custom":
        if d.classes is not None and list(d.classes) != list(CLASS_NAME_SETS[d.name]):
            raise ConfigError(f"'data.classes' is for data.name=custom; data.name={d.name} has "
                              f"its own {len(CLASS_NAME_SETS[d.name])} classes")
        return
    if d.classes is None:
        path = Path(d.list_dir) / CLASS_LIST_FILE
        if path.is_file():  # else left for a checkpoint's saved config to give (tools)
            d.classes = read_class_list(path)
    if d.classes is not None:
        classes = list(d.classes)
        if len(classes) < 2 or classes[0] != "background" or len(set(classes)) != len(classes):
            raise ConfigError(f"'data.classes' must be distinct names, 'background' first and "
                              f"at least one class after it, got {classes[:5]}")


def class_names(cfg: DictConfig) -> list[str]:
    """The class names of ``cfg.data``, background first."""
    if cfg.data.name != "custom":
        return list(CLASS_NAME_SETS[cfg.data.name])
    if cfg.data.classes is None:
        raise ConfigError(
            f"data.name=custom needs its class names: {Path(cfg.data.list_dir) / CLASS_LIST_FILE} "
            "is missing (tools/prepare_tags.py writes it), data.classes is not set, and no "
            "checkpoint gave them")
    return list(cfg.data.classes)


def num_classes(cfg: DictConfig) -> int:
    """Classes including background (21 for VOC, 81 for COCO, 9 for the demo)."""
    return len(class_names(cfg))


def thresholds(cfg: DictConfig) -> CamThresholds:
    th = cfg.cam.thresholds
    return CamThresholds(th.background, th.high, th.low)


def model_kwargs(cfg: DictConfig) -> dict:
    m = cfg.model
    return dict(backbone=m.backbone, num_classes=num_classes(cfg),
                embedding_dim=m.embedding_dim, stride=tuple(m.stride), pooling=m.pooling,
                pretrained=m.pretrained, drop_path_rate=m.drop_path_rate)


def lr_mults(cfg: DictConfig) -> dict:
    """``{group name: multiplier}`` for ``afa.engine.optim.build_optimizer``."""
    return dict(OmegaConf.to_container(cfg.optim.lr_mults))


def par_kwargs(cfg: DictConfig) -> dict:
    return dict(dilations=tuple(cfg.par.dilations), num_iter=cfg.par.num_iter)


def image_set_kwargs(cfg: DictConfig, split: str) -> dict:
    """``afa.inference.ImageSet`` keyword arguments for ``split`` of ``cfg.data``."""
    d = cfg.data
    return dict(root=d.root, name_list=Path(d.list_dir) / f"{split}.txt",
                num_classes=num_classes(cfg), mask_dir=d.mask_dir,
                split_subdir=split if d.split_subdirs else None,
                label_file=Path(d.list_dir) / "cls_labels.json")
