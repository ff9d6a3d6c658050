"""Train AFA: one iteration-counted loop for VOC, COCO and the synthetic demo.

Single process (CPU or one GPU; gradients are accumulated to keep the config's global batch):

    python tools/train.py --config configs/voc.yaml [--work-dir DIR] [--resume auto|PATH] [key=value ...]

Several GPUs on one machine (DDP over NCCL; on CPU the same command uses gloo):

    torchrun --nproc_per_node=2 tools/train.py --config configs/voc.yaml

SLURM, any number of nodes (one task per GPU; see the script for pre-emption and requeue):

    sbatch launch/slurm_voc.sh

Overrides use the config's dotted keys, e.g. ``train.max_iters=1000 model.pretrained=null``.
``--work-dir`` is the same as ``work_dir=DIR``. A run stopped by Ctrl-C, SIGTERM or SIGUSR1 saves a
checkpoint first; ``--resume auto`` continues from the latest checkpoint in the work dir.
"""

from __future__ import annotations

import argparse
import sys

from afa.config import ConfigError, load_config
from afa.data import DataError
from afa.engine.trainer import TrainingInterrupted, train


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/voc.yaml")
    parser.add_argument("--work-dir", help="where checkpoints and logs go (sets work_dir)")
    parser.add_argument("--resume", default=None,
                        help="'auto' (latest checkpoint in the work dir, if any) or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.work_dir:
        overrides.append(f"work_dir={args.work_dir}")
    try:
        cfg = load_config(args.config, overrides)
        train(cfg, resume=args.resume)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        return 128 + stop.signum  # the shell's convention; SLURM requeues such jobs
    return 0


if __name__ == "__main__":
    sys.exit(main())
