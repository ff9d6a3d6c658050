"""Score a checkpoint's CAMs, pseudo labels and segmentation on a labelled split.

    python tools/evaluate.py --config configs/voc.yaml \\
        --checkpoint work_dirs/voc/checkpoints/best.pth \\
        [--split val] [--limit N] [--json OUT.json] [key=value ...]
    torchrun --nproc_per_node=2 tools/evaluate.py --config ... --checkpoint ...   (images sharded)

What it scores: the mIoU and per-class IoU of five label maps against the ground-truth masks (see
afa/engine/validate.py), the same pass as the trainer's validation: the CAM label (multi-scale
CAM, cam.scales), the PAR-refined CAM label, the affinity-propagated CAM, the affinity pseudo
label and the segmentation; plus the classification F1. The segmentation here is SINGLE-SCALE,
no flip, no CRF. The paper's tables (VOC val 66.0) use tools/infer_seg.py (multi-scale + flip
test, --crf) followed by tools/eval_miou.py; docs/RESULTS.md says which number comes from which.

Checkpoints: ours and the authors' (a bare state dict, ``module.`` prefixes from DDP allowed). No
ImageNet weights are needed or read (model.pretrained is ignored). Our checkpoints carry their
run's config: the network settings (model.backbone, model.embedding_dim, model.stride,
model.pooling) are taken from it, with a printed line naming those that differ from --config
(see afa/engine/run_config.py); its classes (data.name) must be the config's.

What is printed (standard output, first process only): a note when the split's name list is a
subset left by ``tools/prepare_voc.py --skip-missing`` (``<list>: N of M listed ids (K left out
...)``), the checkpoint note above, a note when only the first N images are scored, then the
table (IoU in %, one row per class, one column per label map, the mIoU row, the F1 in %). Nothing
else is written unless --json is given. Exit status: 0 done; 2 bad config, data or checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch.utils.data import Subset

from afa import config as C
from afa.config import ConfigError, load_config
from afa.data import build_datasets, class_names
from afa.data.lists import subset_note
from afa.engine import distributed as D
from afa.engine.precision import resolve_amp
from afa.engine.run_config import model_config_from_checkpoint
from afa.engine.validate import format_table, validate
from afa.errors import USER_ERRORS
from afa.models import PAR, AFANet


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="the YAML config of the data (and, for the authors' checkpoints, of "
                             "the network), e.g. configs/voc.yaml")
    parser.add_argument("--checkpoint", required=True,
                        help="our checkpoint (work_dirs/*/checkpoints/*.pth) or the authors'")
    parser.add_argument("--split",
                        help="split to score: data.list_dir/<split>.txt with its masks (default: "
                             "the config's data.val_split); sets data.val_split")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="score only the first N images of the list (a quick check; the "
                             "scores are then not those of the split); the same as "
                             "data.val_max_images=N, which the config may also set")
    parser.add_argument("--json", metavar="OUT.json",
                        help="also write the scores here: per label map the mIoU, per-class IoU "
                             "(fractions, not %%), pixel and mean accuracy; cls_f1; and split, "
                             "num_images (scored), split_images (listed), checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.root=... device=cpu cam.scales=[1.0]")
    return parser.parse_args(argv)


def _image_limit(args, cfg_overrides: list[str]) -> list[str]:
    """The ``data.val_max_images`` override that ``--limit`` stands for (none without it)."""
    if args.limit is None:
        return []
    if args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    given = [o.split("=", 1)[1].strip() for o in cfg_overrides
             if o.split("=", 1)[0].strip() == "data.val_max_images"]
    if given and given[-1] != str(args.limit):
        raise ConfigError(f"--limit {args.limit} and data.val_max_images={given[-1]} disagree; "
                          "give one of them")
    return [f"data.val_max_images={args.limit}"]


def main(argv=None) -> int:
    args = parse_args(argv)
    main_process = D.env_rank() == 0
    try:
        overrides = list(args.overrides) + _image_limit(args, args.overrides)
        if args.split:
            overrides.append(f"data.val_split={args.split}")
        cfg = load_config(args.config, overrides)
        # The run's own data (where it trained) unless the command line names other data.
        cfg, _, taken = model_config_from_checkpoint(cfg, args.checkpoint, overrides, data=True)
        if taken and main_process:
            print(taken, flush=True)
        note = subset_note(Path(cfg.data.list_dir) / f"{cfg.data.val_split}.txt")
        if note and main_process:
            print(note, flush=True)
        names = class_names(cfg)
        _, dataset = build_datasets(cfg)
        split_images = len(dataset)
        if cfg.data.val_max_images:
            dataset = Subset(dataset, range(min(cfg.data.val_max_images, split_images)))
            if main_process:
                print(f"scoring the first {len(dataset)} of {split_images} images of "
                      f"{cfg.data.val_split} (--limit / data.val_max_images): not the split's "
                      "scores", flush=True)
        model = AFANet(**C.model_kwargs(cfg))
        model.load_weights(args.checkpoint)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = D.init_distributed(cfg.device)
    try:
        model.to(info.device)
        scores = validate(model, dataset, par=PAR(**C.par_kwargs(cfg)).to(info.device),
                          device=info.device, cam_scales=tuple(cfg.cam.scales),
                          thresholds=C.thresholds(cfg), radius=cfg.cam.radius,
                          class_names=names, amp=resolve_amp(info.device, cfg.train.amp),
                          batch_size=cfg.data.val_batch)
    finally:
        D.cleanup()
    if info.rank == 0:
        print(f"{cfg.data.val_split}, {len(dataset)} images, single-scale (no flip, no CRF); "
              "IoU and F1 in %")
        print(format_table(scores, names))
        if args.json:
            record = {**scores, "split": cfg.data.val_split, "num_images": len(dataset),
                      "split_images": split_images,
                      "checkpoint": str(Path(args.checkpoint).resolve())}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
