"""Train AFA: one iteration-counted loop for VOC, COCO and the synthetic demo.

Single process (CPU or one GPU; the config's global batch is kept, with gradient accumulation when
``train.batch_per_gpu`` is smaller):

    python tools/train.py --config configs/voc.yaml [--work-dir DIR] [--resume auto|PATH] [key=value ...]

Several GPUs on one machine (DDP over NCCL; on CPU the same command uses gloo):

    torchrun --nproc_per_node=2 tools/train.py --config configs/voc.yaml

SLURM, one task per GPU on any number of nodes; the job requeues itself when the time limit's
SIGUSR1 has stopped the trainer (status 138); the script's header has the details:

    sbatch [--nodes=N] launch/slurm_voc.sh [key=value ...]

Overrides use the config's dotted keys, e.g. ``train.max_iters=1000 model.pretrained=null``.
``--work-dir`` is the same as ``work_dir=DIR``.

Stopping and resuming: Ctrl-C, SIGTERM or SIGUSR1 (to the process or its whole process group)
saves a checkpoint of the last finished iteration, then exits with status 128 + the signal number
(130, 143, 138); during validation the stop takes effect at the next image and the validation is
redone on resume. A second signal exits at once. ``--resume auto`` continues from the latest
checkpoint in the work dir; the config must be the checkpoint's, except for keys named with
``--allow-config-change``. A fresh run refuses a work dir that holds another run's checkpoints or
metrics unless ``--overwrite`` is given.

A work dir holds one run at a time: a second trainer started on it is refused at once, naming the
process that holds it (the lock ends with that process, however it ends). Checkpoints are read
as data only: a file that would run code when unpickled is refused, as is a truncated one (with
``--resume auto`` the newest readable checkpoint is taken, and the skipped ones named).

Exit status: 0 done (also when ``--resume auto`` finds the run finished: the log says so); 2 bad
config, data, weights or checkpoint, a work dir in use, a file that cannot be written (named;
after a checkpoint when found mid-run);
3 non-finite loss or gradient (after a checkpoint of the last finite state); 128 + N stopped by
signal N.
"""

from __future__ import annotations

import argparse
import sys

from afa.config import load_config
from afa.engine.trainer import TrainingInterrupted, train
from afa.errors import USER_ERRORS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/voc.yaml")
    parser.add_argument("--work-dir", help="where checkpoints and logs go (sets work_dir)")
    parser.add_argument("--resume", default=None,
                        help="'auto' (latest checkpoint in the work dir, if any) or a checkpoint path")
    parser.add_argument("--overwrite", action="store_true",
                        help="empty a work dir that holds another run (checkpoints, metrics, tb/, "
                             "logs) before starting; without it such a dir is refused")
    parser.add_argument("--allow-config-change", nargs="+", default=[], metavar="KEY",
                        help="with --resume: config keys (e.g. train.max_iters), sections (train) "
                             "or 'all' that may differ from the checkpoint's config")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow --allow-config-change, whose nargs="+" would take them as keys.
    keys = [k for k in args.allow_config_change if "=" not in k]
    args.overrides += [k for k in args.allow_config_change if "=" in k] + extra
    args.allow_config_change = keys
    unknown = [o for o in args.overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.work_dir:
        overrides.append(f"work_dir={args.work_dir}")
    try:
        cfg = load_config(args.config, overrides)
        train(cfg, resume=args.resume, overwrite=args.overwrite,
              allow_config_change=args.allow_config_change)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only or missing folder: the path and the cause
        print(f"error: cannot write or read '{err.filename}': {err.strerror}" if err.filename
              else f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except TrainingInterrupted as stop:
        print(f"afa: {stop}", file=sys.stderr)
        return 128 + stop.signum  # the shell's convention; launch/slurm_*.sh requeue on 138
    return 0


if __name__ == "__main__":
    sys.exit(main())
