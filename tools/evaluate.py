"""Score a checkpoint's CAMs, pseudo labels and segmentation on a labelled split.

    python tools/evaluate.py --config configs/voc.yaml --checkpoint work_dirs/voc/checkpoints/best.pth \
        [--split val] [--json OUT.json] [key=value ...]
    torchrun --nproc_per_node=2 tools/evaluate.py --config ... --checkpoint ...   (images sharded)

Reports the mIoU of five label maps against the ground truth (see ``afa.engine.validate``): the
CAM label, the PAR-refined CAM label, the affinity-propagated CAM, the affinity pseudo label and the
single-scale segmentation, plus the classification F1. Accepts our checkpoints and the authors'
(``module.``-prefixed) ones. For the multi-scale, CRF-post-processed segmentation of the paper's
tables use ``tools/infer_seg.py``. When the split's name list has a ``left_out.json`` beside it that
names it (``tools/prepare_voc.py --skip-missing``), the run starts by printing ``<list>: N of M
listed ids (K left out by prepare_voc --skip-missing, see <path>)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


from afa import config as C
from afa.config import ConfigError, load_config
from afa.data import DataError
from afa.data.lists import subset_note
from afa.engine import distributed as D
from afa.data import build_datasets, class_names
from afa.engine.validate import format_table, validate
from afa.models import PAR, AFANet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", help="split to score (default: the config's data.val_split)")
    parser.add_argument("--json", help="write the scores here")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ["model.pretrained=null"]
    if args.split:
        overrides.append(f"data.val_split={args.split}")
    try:
        cfg = load_config(args.config, overrides)
        note = subset_note(Path(cfg.data.list_dir) / f"{cfg.data.val_split}.txt")
        if note and int(os.environ.get("RANK", 0)) == 0:
            print(note, flush=True)
        _, dataset = build_datasets(cfg)
        model = AFANet(**C.model_kwargs(cfg))
        model.load_weights(args.checkpoint)
    except (ConfigError, DataError, FileNotFoundError, KeyError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = D.init_distributed(cfg.device)
    try:
        model.to(info.device)
        names = class_names(cfg)
        scores = validate(model, dataset, par=PAR(**C.par_kwargs(cfg)).to(info.device),
                          device=info.device, cam_scales=tuple(cfg.cam.scales),
                          bkg_score=cfg.cam.bkg_score, low=cfg.cam.low, radius=cfg.cam.radius,
                          class_names=names, amp=cfg.train.amp)
    finally:
        D.cleanup()
    if info.rank == 0:
        print(format_table(scores, names))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
