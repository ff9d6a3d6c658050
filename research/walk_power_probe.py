"""tools/ablate_affinity.py with the random walk's power set by WALK_POWER (the paper: 2).

    WALK_POWER=4 python research/walk_power_probe.py --config configs/demo_full.yaml \
        --checkpoint CKPT [key=value ...]        (the arguments of tools/ablate_affinity.py)

Replaces afa.affinity.random_walk, which afa.affinity.propagate_cams calls, for this process
only (logs/affinity_probes_20261201/README.md)."""
import os, runpy, sys
from pathlib import Path
import torch
import afa.affinity as A
P = float(os.environ["WALK_POWER"])
def random_walk(scores, aff, mask):
    trans = (aff * mask) ** P
    trans = trans / (trans.sum(dim=1, keepdim=True) + 0.1)
    return torch.bmm(scores, trans)
A.random_walk = random_walk
TOOL = str(Path(__file__).resolve().parents[1] / "tools" / "ablate_affinity.py")
sys.argv = [TOOL] + sys.argv[1:]
runpy.run_path(TOOL, run_name="__main__")
