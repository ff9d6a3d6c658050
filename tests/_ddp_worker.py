"""Run by tests through torchrun: train, then save this rank's final weights and scores."""

import json
import os
import sys
from pathlib import Path

import torch

from afa.config import load_config
from afa.engine.trainer import train


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    result = train(cfg)
    rank = int(os.environ.get("RANK", 0))
    out = Path(cfg.work_dir)
    torch.save(result.model.state_dict(), out / f"rank{rank}_model.pth")
    (out / f"rank{rank}_scores.json").write_text(json.dumps(result.scores))


if __name__ == "__main__":
    main()
