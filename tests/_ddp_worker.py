"""Run by tests through torchrun: train, then save this rank's final weights and scores.

    _ddp_worker.py CONFIG [--resume auto|PATH] [key=value ...]
"""

import json
import os
import sys
from pathlib import Path

import torch

from afa.config import load_config
from afa.engine.trainer import train


def main() -> None:
    args = sys.argv[2:]
    resume = None
    if args[:1] == ["--resume"]:
        resume, args = args[1], args[2:]
    cfg = load_config(sys.argv[1], args)
    result = train(cfg, resume=resume)
    rank = int(os.environ.get("RANK", 0))
    out = Path(cfg.work_dir)
    torch.save(result.model.state_dict(), out / f"rank{rank}_model.pth")
    (out / f"rank{rank}_scores.json").write_text(json.dumps(result.scores))


if __name__ == "__main__":
    main()
