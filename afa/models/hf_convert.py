"""Rename the MiT weights of a Hugging Face ``nvidia/mit-b*`` download to SegFormer key names.

Hugging Face renames the official SegFormer keys and splits ``kv`` into ``key`` and ``value``. The
mapping (Hugging Face name -> official name), per stage ``i`` (0-based) and block ``j``:

    segformer.encoder.patch_embeddings.{i}.proj        -> patch_embed{i+1}.proj
    segformer.encoder.patch_embeddings.{i}.layer_norm  -> patch_embed{i+1}.norm
    segformer.encoder.block.{i}.{j}.layer_norm_1       -> block{i+1}.{j}.norm1
    segformer.encoder.block.{i}.{j}.layer_norm_2       -> block{i+1}.{j}.norm2
    ....attention.self.query                           -> ....attn.q
    ....attention.self.key + ....attention.self.value  -> ....attn.kv   (rows: key, then value)
    ....attention.self.sr / .layer_norm                -> ....attn.sr / .attn.norm
    ....attention.output.dense                         -> ....attn.proj
    ....mlp.dense1 / .mlp.dwconv.dwconv / .mlp.dense2  -> ....mlp.fc1 / .mlp.dwconv.dwconv / .mlp.fc2
    segformer.encoder.layer_norm.{i}                   -> norm{i+1}
    classifier.*                                       -> dropped (ImageNet head)

Such weights come from a download folder or from ``model.pretrained=hf:nvidia/mit-b*`` (the file in
the Hugging Face cache); reading either (and the checks) is :mod:`afa.models.weights`' job.
"""

from __future__ import annotations

import re

import torch

__all__ = ["convert_hf_mit_keys"]

_RULES = [
    (re.compile(r"^patch_embeddings\.(\d)\.layer_norm\."), lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (re.compile(r"^patch_embeddings\.(\d)\."), lambda m: f"patch_embed{int(m[1]) + 1}."),
    (re.compile(r"^block\.(\d)\.(\d+)\."), lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
    (re.compile(r"^layer_norm\.(\d)\."), lambda m: f"norm{int(m[1]) + 1}."),
    (re.compile(r"\.layer_norm_([12])\."), lambda m: f".norm{m[1]}."),
    (re.compile(r"\.attention\.self\.query\."), lambda m: ".attn.q."),
    (re.compile(r"\.attention\.self\.layer_norm\."), lambda m: ".attn.norm."),
    (re.compile(r"\.attention\.self\.sr\."), lambda m: ".attn.sr."),
    (re.compile(r"\.attention\.output\.dense\."), lambda m: ".attn.proj."),
    (re.compile(r"\.mlp\.dense1\."), lambda m: ".mlp.fc1."),
    (re.compile(r"\.mlp\.dense2\."), lambda m: ".mlp.fc2."),
]


def convert_hf_mit_keys(state_dict: dict) -> dict:
    """Map a Hugging Face SegFormer/MiT encoder state dict onto the official key names."""
    out, pending_kv = {}, {}
    for key, value in state_dict.items():
        if key.startswith("classifier.") or key.startswith("decode_head."):
            continue
        key = key.removeprefix("segformer.").removeprefix("encoder.")
        kv = re.search(r"\.attention\.self\.(key|value)\.(weight|bias)$", key)
        if kv:
            prefix = key[: kv.start()]
            pending_kv.setdefault((prefix, kv[2]), {})[kv[1]] = value
            continue
        for pattern, repl in _RULES:
            key = pattern.sub(repl, key)
        out[key] = value
    for (prefix, kind), parts in pending_kv.items():
        if set(parts) != {"key", "value"}:
            raise KeyError(f"'{prefix}.attention.self' has {sorted(parts)} but needs key and value")
        for pattern, repl in _RULES:
            prefix = pattern.sub(repl, prefix + ".")[:-1]
        out[f"{prefix}.attn.kv.{kind}"] = torch.cat([parts["key"], parts["value"]], dim=0)
    return out

