"""Pretrained MiT weights: one-line errors that say what a wrong file holds, and the load record.

Weight files are tiny fakes saved with ``torch.save`` from our own encoders' state dicts, laid out as
the official SegFormer files are (encoder keys plus the ImageNet ``head.*``, plain or wrapped in
``{"state_dict": ...}``). Larger variants are made by hand by repeating block keys, so no mit_b2+
model is ever built.
"""

import hashlib
import json
import re

import pytest
import torch

from afa.engine.checkpoint import capture_rng_state
from afa.models import AFANet, PretrainedWeights, WeightsError, load_pretrained
from afa.models import mix_transformer as mit
from afa.models import weights


def _official(encoder, wrap=False):
    """An official-format ImageNet checkpoint of ``encoder``: its keys plus the classifier head."""
    state = dict(encoder.state_dict())
    state["head.weight"] = torch.randn(1000, encoder.embed_dims[3])
    state["head.bias"] = torch.randn(1000)
    return {"state_dict": state} if wrap else state


def _with_depths(state, depths):
    """``state`` (a 64-wide MiT, e.g. mit_b1) with ``depths`` blocks per stage, made by repeating
    block 0 of each stage: the key names and shapes of mit_b2 .. mit_b5 without building them."""
    out = {k: v for k, v in state.items() if not k.startswith("block")}
    for i, depth in enumerate(depths, start=1):
        first = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"block{i}.0.")}
        for j in range(depth):
            out.update({f"block{i}.{j}.{rest}": v for rest, v in first.items()})
    return out


def _refusal(model, path, name):
    with pytest.raises(WeightsError) as err:
        load_pretrained(model, path, name=name)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "\n" not in message and str(path) in message
    return message


@pytest.fixture(scope="module")
def b1_encoder():
    return mit.mit_b1()


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "state_dict"])
def test_b0_file_in_b1_model_names_both_variants(tmp_path, b1_encoder, wrap):
    path = tmp_path / "pretrained" / "mit_b1.pth"
    path.parent.mkdir()
    torch.save(_official(mit.mit_b0(), wrap), path)
    message = _refusal(b1_encoder, path, "mit_b1")
    assert message == (f"{path} holds mit_b0 weights, but model.backbone is mit_b1: set "
                       f"model.backbone=mit_b0 or model.pretrained={path}")


@pytest.mark.parametrize("variant", ["mit_b2", "mit_b3", "mit_b4", "mit_b5"])
def test_deeper_variant_is_told_by_its_block_counts(tmp_path, b1_encoder, variant):
    state = _with_depths(_official(b1_encoder), mit.MIT_SETTINGS[variant][2])
    torch.save(state, tmp_path / f"{variant}.pth")
    message = _refusal(b1_encoder, tmp_path / f"{variant}.pth", "mit_b1")
    assert f"holds {variant} weights, but model.backbone is mit_b1" in message
    assert f"model.backbone={variant} or model.pretrained={tmp_path / 'mit_b1.pth'}" in message


def test_b1_file_in_b0_model_via_afanet(tmp_path, b1_encoder):
    torch.save(_official(b1_encoder), tmp_path / "weights.pth")
    with pytest.raises(WeightsError, match=r"holds mit_b1 weights, but model\.backbone is mit_b0"):
        AFANet("mit_b0", num_classes=4, pretrained=tmp_path / "weights.pth")


def test_reference_shapes_tell_every_official_variant(reference_dir):
    """The inference works on the real files' names and shapes, head included."""
    reference = json.loads((reference_dir / "mit_imagenet_state_dict_shapes.json").read_text())
    for name, shapes in reference.items():
        state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
        assert weights._describe(state) == (name, f"{name} weights")


def _trainer_checkpoint(model):
    """Our training checkpoint: model plus optimiser, RNG (NumPy arrays), iteration and config."""
    return {"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
            "iteration": 10, "rng": [capture_rng_state()], "config": {"model": {"backbone": "b0"}}}


@pytest.mark.parametrize("kind", ["plain", "module_prefix", "ours"])
def test_afa_checkpoint_is_named_a_full_model_checkpoint(tmp_path, kind):
    model = AFANet("mit_b0", num_classes=4)
    if kind == "plain":
        saved = model.state_dict()
    elif kind == "module_prefix":  # the authors' DDP-saved checkpoints
        saved = {"module." + k: v for k, v in model.state_dict().items()}
    else:
        saved = _trainer_checkpoint(model)
    torch.save(saved, tmp_path / "best.pth")
    message = _refusal(mit.mit_b0(), tmp_path / "best.pth", "mit_b0")
    assert message == (f"{tmp_path / 'best.pth'} holds a full AFA model checkpoint (encoder.*, "
                       "decoder.*); model.pretrained wants the ImageNet MiT encoder weights "
                       "mit_b0.pth")


@pytest.mark.parametrize("saved, holds", [
    ({"fc.weight": torch.zeros(3, 2), "fc.bias": torch.zeros(3)},
     "no MiT weights (2 keys such as 'fc.weight')"),
    ({}, "no MiT weights (an empty state dict)"),
    ([torch.zeros(2)], "no MiT weights (a list, not a state dict)"),
])
def test_file_without_mit_weights_says_what_it_holds(tmp_path, saved, holds):
    torch.save(saved, tmp_path / "w.pth")
    message = _refusal(mit.mit_b0(), tmp_path / "w.pth", "mit_b0")
    assert f"holds {holds}; model.pretrained wants the ImageNet MiT encoder weights mit_b0.pth" \
        in message


def test_mit_of_no_official_variant_reports_its_layout(tmp_path):
    odd = mit.MixVisionTransformer(embed_dims=(16, 32, 80, 128), depths=(1, 1, 1, 1))
    torch.save(_official(odd), tmp_path / "odd.pth")
    message = _refusal(mit.mit_b0(), tmp_path / "odd.pth", "mit_b0")
    assert ("MiT weights of no official variant (stage widths (16, 32, 80, 128), blocks per stage "
            "(1, 1, 1, 1))") in message


def test_right_variant_that_does_not_fit_names_the_key(tmp_path):
    torch.save(_official(mit.mit_b0(in_chans=4)), tmp_path / "mit_b0.pth")
    message = _refusal(mit.mit_b0(), tmp_path / "mit_b0.pth", "mit_b0")
    assert re.search(r"holds mit_b0 weights that do not fit the mit_b0 encoder: "
                     r"'patch_embed1\.proj\.weight' has shape \(32, 4, 7, 7\)", message)


def _truncated(tmp_path):
    torch.save(_official(mit.mit_b0()), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("content", [
    lambda tmp_path: b"<html>404 Not Found</html>\n" * 10,
    lambda tmp_path: bytes(range(256)) * 4,
    lambda tmp_path: b"",
    _truncated,
], ids=["html", "garbage", "empty", "truncated"])
def test_unreadable_file_is_one_line(tmp_path, content):
    path = tmp_path / "mit_b0.pth"
    path.write_bytes(content(tmp_path))
    message = _refusal(mit.mit_b0(), path, "mit_b0")
    assert f"{path} cannot be read as a PyTorch checkpoint" in message


def test_missing_file_shows_the_command_line_syntax(tmp_path):
    path = tmp_path / "nowhere" / "mit_b1.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_pretrained(mit.mit_b1(), path, name="mit_b1")
    message = str(err.value)
    assert str(path) in message and "SegFormer" in message
    assert "model.pretrained=/path/to/mit_b1.pth" in message
    assert "model.pretrained=null" in message
    # The hub id of the variant, where the weights can still be had (tests/test_hf_hub.py).
    assert "model.pretrained=hf:nvidia/mit-b1" in message


def test_right_file_loads_and_is_recorded(tmp_path):
    state = _official(mit.mit_b0(), wrap=True)
    path = tmp_path / "mit_b0.pth"
    torch.save(state, path)
    encoder = mit.mit_b0()
    info = load_pretrained(encoder, path, name="mit_b0")
    assert isinstance(info, PretrainedWeights)
    assert info == (str(path), hashlib.sha256(path.read_bytes()).hexdigest()[:12], "mit_b0")
    assert info._asdict() == {"path": str(path), "sha256": info.sha256, "variant": "mit_b0"}
    assert str(info) == f"mit_b0 weights from {path} (sha256 {info.sha256})"
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, state["state_dict"][k]), k


def test_sha256_prefix_reads_in_chunks(tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB: several chunks of 64 KiB
    (tmp_path / "blob").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert weights.sha256_prefix(tmp_path / "blob", chunk_bytes=1 << 16) == expected[:12]
    assert weights.sha256_prefix(tmp_path / "blob", digits=64) == expected


def test_afanet_keeps_the_record(tmp_path):
    torch.save(_official(mit.mit_b0()), tmp_path / "mit_b0.pth")
    model = AFANet("mit_b0", num_classes=4, pretrained=tmp_path / "mit_b0.pth")
    assert model.pretrained_info == load_pretrained(mit.mit_b0(), tmp_path / "mit_b0.pth",
                                                    name="mit_b0")
    assert model.pretrained_info.variant == "mit_b0"
    assert AFANet("mit_b0", num_classes=4).pretrained_info is None
