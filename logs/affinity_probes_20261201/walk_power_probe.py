"""Throw-away: ablate_affinity with the walk's power set by WALK_POWER (paper: 2)."""
import os, runpy, sys
import torch
import afa.affinity as A
P = float(os.environ["WALK_POWER"])
def random_walk(scores, aff, mask):
    trans = (aff * mask) ** P
    trans = trans / (trans.sum(dim=1, keepdim=True) + 0.1)
    return torch.bmm(scores, trans)
A.random_walk = random_walk
sys.argv = ["tools/ablate_affinity.py"] + sys.argv[1:]
runpy.run_path("tools/ablate_affinity.py", run_name="__main__")
