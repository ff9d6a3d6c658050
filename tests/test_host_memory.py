"""afa.host_memory: freed CPU memory is reused, not faulted in anew every step."""

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A step's pattern: the same large tensors (64 MiB here) allocated, written and freed again and
# again. Minor page faults count the pages the kernel had to map and zero for each round.
_ROUNDS = textwrap.dedent("""
    import json, resource, torch
    from afa.host_memory import keep_freed_host_memory
    torch.set_num_threads(1)
    state = keep_freed_host_memory()
    def one_round():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(16 * 2**20)
        x.fill_(1.0)
        y = x * 2
        del x, y
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"state": state, "faults": [one_round() for _ in range(30)]}))
""")


def _rounds(keep: str) -> dict:
    env = dict(os.environ, AFA_KEEP_HOST_MEMORY=keep, PYTHONPATH=str(REPO))
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", _ROUNDS], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the setting exists in glibc only")
def test_a_repeated_large_tensor_reuses_its_memory_instead_of_faulting_it_in():
    kept = _rounds("1")
    assert kept["state"].startswith("freed memory kept for reuse"), kept
    # Once the heap has grown to fit the round (within the first 3-6 rounds here; placement
    # shifts by a few bytes each round at first), a round maps no new pages (2 x 64 MiB would be
    # 32,768 faults of 4 kB pages).
    assert sum(kept["faults"][-10:]) < 1000, kept["faults"]

    own = _rounds("0")
    assert own["state"] == "the C library's own (set by AFA_KEEP_HOST_MEMORY=0)"
    # glibc's defaults: both 64 MiB blocks are new mappings every round, faulted in page by page.
    assert all(f >= 2 * 16384 for f in own["faults"][-10:]), own["faults"]


def test_the_call_is_idempotent_and_the_variable_opts_out(monkeypatch):
    import afa.host_memory as H

    monkeypatch.setattr(H, "_state", None)
    monkeypatch.setenv(H.ENV_VAR, "off")
    first = H.keep_freed_host_memory()
    assert first == "the C library's own (set by AFA_KEEP_HOST_MEMORY=0)"
    monkeypatch.setenv(H.ENV_VAR, "1")
    assert H.keep_freed_host_memory() == first  # decided once per process
