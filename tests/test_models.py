"""The AFA network: MiT variants, shapes, attention logits, gradients, checkpoints, the decoder
against SegFormer's concatenating head.

Tests that take ``device`` run on ``TORCH_DEVICE`` (see conftest); layout and weight-file tests
need no device (``meta`` tensors, CPU files).
"""

import hashlib
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import device_tol

from afa.models import (AFANet, WeightsError, convert_sync_batchnorm, load_pretrained,
                        load_state_dict_flexible)
from afa.models import mix_transformer as mit
from afa.models.hf_convert import convert_hf_mit_keys

VARIANTS = ["mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5"]


def _shapes(state_dict):
    return {k: list(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_matches_official_state_dict(name, reference_dir):
    reference = json.loads((reference_dir / "mit_imagenet_state_dict_shapes.json").read_text())[name]
    reference = {k: v for k, v in reference.items() if not k.startswith("head.")}
    with torch.device("meta"):
        encoder = getattr(mit, name)()
    assert _shapes(encoder.state_dict()) == reference


def test_afanet_matches_authors_checkpoint_layout(reference_dir):
    reference = json.loads((reference_dir / "afa_mit_b1_voc_checkpoint_shapes.json").read_text())
    with torch.device("meta"):
        model = AFANet("mit_b1", num_classes=21)
    assert _shapes(model.state_dict()) == reference


@pytest.mark.parametrize("name, channels", [("mit_b0", 16), ("mit_b2", 24), ("mit_b4", 24)])
def test_attention_width_is_derived_from_encoder(name, channels):
    with torch.device("meta"):
        model = AFANet(name, num_classes=5)
    assert model.attn_proj.in_channels == channels == model.encoder.depths[3] * 8


def _expected_sizes(size, strides=(4, 2, 2, 1)):
    sizes = []
    for i, s in enumerate(strides):
        k = 7 if i == 0 else 3
        size = (size + 2 * (k // 2) - k) // s + 1
        sizes.append(size)
    return sizes


@pytest.mark.parametrize("hw", [(64, 64), (50, 77), (97, 33)])
def test_output_shapes_and_strides(hw, device):
    model = AFANet("mit_b0", num_classes=6).to(device).eval()
    x = torch.randn(2, 3, *hw, device=device)
    with torch.no_grad():
        features, attn = model.encoder(x)
        out = model(x)
    hs, ws = _expected_sizes(hw[0]), _expected_sizes(hw[1])
    for i, f in enumerate(features):
        assert f.shape == (2, model.encoder.embed_dims[i], hs[i], ws[i])
    # stride 16 at stage 4 means ceil(H/16) with AFA's (4, 2, 2, 1)
    assert (hs[3], ws[3]) == (math.ceil(hw[0] / 16), math.ceil(hw[1] / 16))
    n = hs[3] * ws[3]
    assert out.cls_logits.shape == (2, 5)
    assert out.seg_logits.shape == (2, 6, hs[0], ws[0])
    assert len(out.attn_logits) == 2 and all(a.shape == (2, 8, n, n) for a in out.attn_logits)
    assert out.aff_pred.shape == (2, n, n)
    cam, aff = model.forward_cam(x)
    assert cam.shape == (2, 5, hs[3], ws[3])
    assert out.grid == (hs[3], ws[3]) and aff.device == out.seg_logits.device == x.device
    torch.testing.assert_close(aff, out.aff_pred, **device_tol(device, 1.3e-6, 1e-5))
    torch.testing.assert_close(cam, out.cam_logits, **device_tol(device, 1.3e-6, 1e-5))
    assert model(x, cls_only=True).cam_logits is None


def test_configurable_strides(device):
    encoder = mit.mit_b0(strides=(4, 2, 2, 2)).to(device).eval()
    features, _ = encoder(torch.randn(1, 3, 64, 64, device=device))
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2]
    assert encoder.stride == 32


def test_set_strides_equals_a_model_built_at_those_strides(device):
    """train.cls_phase_stride switches a built model's strides: the same outputs, grid and
    shortest accepted side as a model built at them, on an odd photo-like size."""
    torch.manual_seed(0)
    switched = AFANet("mit_b0", num_classes=4, embedding_dim=32, stride=(4, 2, 2, 1)).to(device)
    built = AFANet("mit_b0", num_classes=4, embedding_dim=32, stride=(4, 2, 1, 1)).to(device)
    built.load_state_dict(switched.state_dict())
    switched.encoder.set_strides([4, 2, 1, 1])
    switched.eval(), built.eval()
    x = torch.randn(1, 3, 75, 101, device=device)
    with torch.no_grad():
        a, b = switched(x), built(x)
    assert a.grid == b.grid == (10, 13) and switched.stride == built.stride == 8
    assert switched.encoder.min_input_side == built.encoder.min_input_side
    for name in ("cls_logits", "seg_logits", "aff_pred", "cam_logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_attention_logits_equal_hand_computation(device):
    model = AFANet("mit_b0", num_classes=4).to(device).eval()
    captured = {}
    block = model.encoder.block4[1]
    block.attn.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 48, 64, device=device))
        x = captured["x"]  # (B, N, C) input of the attention, after norm1
        b, n, c = x.shape
        heads = block.attn.num_heads
        q = F.linear(x, block.attn.q.weight, block.attn.q.bias)
        k = F.linear(x, block.attn.kv.weight[:c], block.attn.kv.bias[:c])
        q = q.view(b, n, heads, c // heads).permute(0, 2, 1, 3)
        k = k.view(b, n, heads, c // heads).permute(0, 2, 1, 3)
        expected = torch.einsum("bhid,bhjd->bhij", q, k)  # unscaled, before softmax
    torch.testing.assert_close(out.attn_logits[1], expected, **device_tol(device, 1e-5, 1e-5))


@pytest.mark.parametrize("stage", [1, 2, 4])
def test_fused_attention_equals_explicit(stage, device):
    encoder = mit.mit_b0().to(device).eval()
    block = getattr(encoder, f"block{stage}")[0]
    dim = encoder.embed_dims[stage - 1]
    h, w = 12, 10
    x = torch.randn(2, h * w, dim, device=device)
    with torch.no_grad():
        fused, none = block.attn(x, h, w, return_attn=False)
        explicit, logits = block.attn(x, h, w, return_attn=True)
    assert none is None and logits is not None
    torch.testing.assert_close(fused, explicit, **device_tol(device, 1e-5, 1e-5))


def test_encoder_with_all_explicit_blocks_equals_default(device):
    encoder = mit.mit_b0().to(device).eval()
    x = torch.randn(1, 3, 64, 80, device=device)
    with torch.no_grad():
        default, _ = encoder(x)
        for i in range(1, 4):
            for blk in getattr(encoder, f"block{i}"):
                blk.return_attn = True
        explicit, attn = encoder(x)
    assert len(attn) == sum(encoder.depths)
    for a, b in zip(default, explicit):
        torch.testing.assert_close(a, b, **device_tol(device, 1e-5, 1e-5))


def test_affinity_is_symmetric_probability(device):
    model = AFANet("mit_b0", num_classes=3).to(device).eval()
    with torch.no_grad():
        aff = model(torch.randn(2, 3, 64, 64, device=device)).aff_pred
    torch.testing.assert_close(aff, aff.transpose(1, 2))
    assert aff.min() > 0 and aff.max() < 1


def test_affinity_projection_equals_stacked_symmetric_conv(device):
    """The projected-then-symmetrised affinity equals the literal sigmoid(conv(A + A^T)), and so
    do the gradients reaching the attention logits and the projection."""
    torch.manual_seed(0)
    model = AFANet("mit_b0", num_classes=3)
    nn.init.normal_(model.attn_proj.weight)
    nn.init.normal_(model.attn_proj.bias)
    model.to(device)
    logits = [torch.randn(2, 8, 12, 12, device=device, requires_grad=True) for _ in range(2)]
    fast = model._affinity(logits)
    stacked = torch.cat(logits, dim=1)
    literal = torch.sigmoid(model.attn_proj(stacked + stacked.transpose(-1, -2))).squeeze(1)
    torch.testing.assert_close(fast, literal, **device_tol(device, 1e-5, 1e-6))
    weights = torch.rand_like(literal)
    grads_fast = torch.autograd.grad((fast * weights).sum(), logits + [model.attn_proj.weight])
    grads_literal = torch.autograd.grad((literal * weights).sum(),
                                        logits + [model.attn_proj.weight])
    for a, b in zip(grads_fast, grads_literal):
        torch.testing.assert_close(a, b, **device_tol(device, 1e-5, 1e-6))


def test_drop_path_drops_whole_samples_and_keeps_the_mean(device):
    drop = mit.DropPath(0.25).train()
    torch.manual_seed(0)
    out = drop(torch.ones(4000, 3, 5, device=device))
    per_sample = out.flatten(1)
    # Each sample is either dropped entirely or kept and scaled by 1 / 0.75.
    assert torch.equal(per_sample.unique().cpu(), torch.tensor([0.0, 1.0 / 0.75]))
    assert (per_sample == per_sample[:, :1]).all()
    assert abs(out.mean().item() - 1.0) < 0.05
    assert torch.equal(drop.eval()(out), out)


def test_every_parameter_gets_a_gradient(device):
    model = AFANet("mit_b0", num_classes=4).to(device).train()
    x = torch.randn(2, 3, 64, 64, device=device)
    out = model(x)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], device=device)
    seg_target = torch.randint(0, 4, out.seg_logits.shape[:1] + out.seg_logits.shape[2:],
                               device=device)
    aff_target = (torch.rand_like(out.aff_pred) > 0.5).float()
    loss = (F.multilabel_soft_margin_loss(out.cls_logits, labels)
            + F.cross_entropy(out.seg_logits, seg_target)
            + F.binary_cross_entropy(out.aff_pred, aff_target))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_param_groups_are_named_and_cover_every_parameter():
    model = AFANet("mit_b0", num_classes=4)
    groups = {g["name"]: g for g in model.param_groups()}
    assert {k: g["lr_mult"] for k, g in groups.items()} == {
        "backbone": 1.0, "backbone_norm": 0.0, "heads": 10.0, "decoder": 10.0}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    norm_names = {n for n, p in model.encoder.named_parameters()
                  if any(p is q for q in groups["backbone_norm"]["params"])}
    assert norm_names and all("norm" in n for n in norm_names)
    assert all(p is not model.classifier.weight for p in groups["backbone"]["params"])


@pytest.mark.parametrize("prefix", ["", "module."])
def test_checkpoint_round_trip(tmp_path, prefix, device):
    """A checkpoint written on the device loads into a CPU model (tools load onto the CPU)."""
    model = AFANet("mit_b0", num_classes=4).to(device)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {prefix + k: v for k, v in model.state_dict().items()}}, path)
    other = AFANet("mit_b0", num_classes=4)
    other.load_weights(path)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert b.device.type == "cpu" and torch.equal(a.cpu(), b), k


def test_checkpoint_of_other_shape_is_refused_with_the_key_named():
    state = AFANet("mit_b0", num_classes=21).state_dict()
    with pytest.raises(RuntimeError, match=r"decoder\.linear_pred\.weight.*\(21, 256, 1, 1\)"):
        load_state_dict_flexible(AFANet("mit_b0", num_classes=5), state)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        AFANet("mit_b0", num_classes=4).load_weights(tmp_path / "nope.pth")


def test_missing_pretrained_file_explains_where_to_get_it(tmp_path):
    path = tmp_path / "pretrained" / "mit_b1.pth"
    with pytest.raises(FileNotFoundError) as err:
        AFANet("mit_b1", pretrained=path)
    message = str(err.value)
    assert str(path) in message and "mit_b1.pth" in message and "SegFormer" in message
    # The syntax that works on the command line: point at the file, or train from scratch.
    assert "model.pretrained=/path/to/mit_b1.pth" in message
    assert "model.pretrained=null" in message


def _official_checkpoint(name):
    """An official-format checkpoint: encoder keys plus the ImageNet ``head``."""
    encoder = getattr(mit, name)()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in encoder.state_dict().items()}
    state["head.weight"] = torch.randn(1000, encoder.embed_dims[3])
    state["head.bias"] = torch.randn(1000)
    return state


def test_official_pretrained_weights_load(tmp_path):
    state = _official_checkpoint("mit_b0")
    torch.save(state, tmp_path / "mit_b0.pth")
    model = AFANet("mit_b0", num_classes=4, pretrained=tmp_path / "mit_b0.pth")
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_wrong_pretrained_variant_is_refused(tmp_path):
    torch.save(_official_checkpoint("mit_b1"), tmp_path / "mit_b1.pth")
    with pytest.raises(WeightsError, match=r"holds mit_b1 weights, but model\.backbone is mit_b0"):
        AFANet("mit_b0", pretrained=tmp_path / "mit_b1.pth")


def _to_hf_names(state):
    """Rename official MiT keys the way Hugging Face's SegformerForImageClassification does."""
    out = {}
    for key, value in state.items():
        if key.startswith("head."):
            out["classifier." + key[5:]] = value
            continue
        parts = key.split(".")
        top = parts[0]
        if top.startswith("patch_embed"):
            i = int(top[-1]) - 1
            rest = ".".join(parts[1:]).replace("norm.", "layer_norm.")
            out[f"segformer.encoder.patch_embeddings.{i}.{rest}"] = value
        elif top.startswith("norm"):
            out[f"segformer.encoder.layer_norm.{int(top[-1]) - 1}.{parts[1]}"] = value
        else:
            i, j, rest = int(top[-1]) - 1, parts[1], ".".join(parts[2:])
            base = f"segformer.encoder.block.{i}.{j}."
            if rest.startswith("attn.kv."):
                kind = parts[-1]
                half = value.shape[0] // 2
                out[base + f"attention.self.key.{kind}"] = value[:half]
                out[base + f"attention.self.value.{kind}"] = value[half:]
                continue
            rest = (rest.replace("norm1.", "layer_norm_1.").replace("norm2.", "layer_norm_2.")
                    .replace("attn.q.", "attention.self.query.")
                    .replace("attn.sr.", "attention.self.sr.")
                    .replace("attn.norm.", "attention.self.layer_norm.")
                    .replace("attn.proj.", "attention.output.dense.")
                    .replace("mlp.fc1.", "mlp.dense1.").replace("mlp.fc2.", "mlp.dense2."))
            out[base + rest] = value
    return out


def test_hugging_face_directory_loads(tmp_path):
    from safetensors.torch import save_file

    state = _official_checkpoint("mit_b0")
    hf = {k: v.contiguous() for k, v in _to_hf_names(state).items()}
    save_file(hf, str(tmp_path / "model.safetensors"))
    assert set(convert_hf_mit_keys(hf)) == {k for k in state if not k.startswith("head.")}
    encoder = mit.mit_b0()
    info = load_pretrained(encoder, tmp_path, name="mit_b0")
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, state[k]), k
    # The record hashes the directory's weight file.
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert info == (str(tmp_path), digest[:12], "mit_b0")


def test_sync_batchnorm_only_for_multi_process_cuda():
    model = AFANet("mit_b0", num_classes=4)
    cpu = convert_sync_batchnorm(model, world_size=2, device=torch.device("cpu"))
    assert isinstance(cpu.decoder.linear_fuse.bn, nn.BatchNorm2d)
    assert not isinstance(cpu.decoder.linear_fuse.bn, nn.SyncBatchNorm)
    gpu = convert_sync_batchnorm(model, world_size=2, device=torch.device("cuda"))
    assert isinstance(gpu.decoder.linear_fuse.bn, nn.SyncBatchNorm)


def test_forward_cam_without_affinity_runs_fused_and_matches(device):
    model = AFANet("mit_b0", num_classes=4).to(device).eval()
    x = torch.randn(2, 3, 64, 48, device=device)
    with torch.no_grad():
        cam, aff = model.forward_cam(x)
        fused_cam, none = model.forward_cam(x, return_aff=False)
        features, attn = model.encoder(x, return_attn=False)
    assert none is None and attn == [] and aff.shape == (2, 12, 12)
    torch.testing.assert_close(fused_cam, cam, **device_tol(device, 1e-5, 1e-5))


def test_multi_scale_cam_of_afanet_equals_all_explicit_computation(device):
    from afa.cam import multi_scale_cam

    model = AFANet("mit_b0", num_classes=4).to(device).eval()
    x = torch.randn(1, 3, 64, 64, device=device)
    with torch.no_grad():
        out = multi_scale_cam(model, x, (1.0, 0.5, 1.5))
        total = 0
        for s in (1.0, 0.5, 1.5):
            xs = F.interpolate(x, size=(int(64 * s),) * 2, mode="bilinear", align_corners=False)
            cam, aff = model.forward_cam(torch.cat([xs, xs.flip(-1)]))  # explicit everywhere
            cam = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)
            total = total + torch.maximum(cam[:1], cam[1:].flip(-1)).relu()
            if s == 1.5:
                expected_aff = aff[:1]
        total = total - total.amin(dim=(2, 3), keepdim=True)
        total = total / (total.amax(dim=(2, 3), keepdim=True) + 1e-5)
    torch.testing.assert_close(out.cam, total, **device_tol(device, 1e-4, 1e-5))
    torch.testing.assert_close(out.aff, expected_aff, **device_tol(device, 1.3e-6, 1e-5))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_and_gradients_on_the_device_match_the_cpu(device, mode):
    """The same weights and input give the CPU's outputs and gradients on TORCH_DEVICE (exactly
    the same on the CPU). Train mode uses batch statistics; the decoder's dropout and drop-path,
    whose random draws differ between devices, are off."""
    torch.manual_seed(0)
    cpu_model = AFANet("mit_b0", num_classes=4, drop_path_rate=0.0).train(mode == "train")
    model = AFANet("mit_b0", num_classes=4, drop_path_rate=0.0).train(mode == "train")
    model.load_state_dict(cpu_model.state_dict())
    model.to(device)
    x = torch.randn(2, 3, 64, 80)
    outputs = []
    for net, inp in ((cpu_model, x), (model, x.to(device))):
        net.decoder.dropout.eval()
        out = net(inp)
        (out.cls_logits.sum() + out.seg_logits.square().mean() + out.aff_pred.mean()).backward()
        outputs.append((out, {n: p.grad for n, p in net.named_parameters()}))
    (ref, ref_grads), (out, grads) = outputs

    def close(actual, expected, name, rtol, atol):
        torch.testing.assert_close(actual.cpu(), expected, **device_tol(device, rtol, atol),
                                   msg=lambda message: f"{name}: {message}")

    assert out.grid == ref.grid == (4, 5)
    for name in ("cls_logits", "seg_logits", "aff_pred", "cam_logits"):
        close(getattr(out, name), getattr(ref, name), name, 1e-5, 1e-5)
    for i, (a, b) in enumerate(zip(out.attn_logits, ref.attn_logits)):
        close(a, b, f"attn_logits[{i}]", 1e-5, 1e-4)
    for name, grad in ref_grads.items():
        if name.startswith("decoder.linear_c") and name.endswith(".bias"):
            continue  # cancelled by the BatchNorm after them: the exact gradient is 0 (noise)
        close(grads[name], grad, f"{name}.grad", 1e-4, 1e-6)
    for name, buf in cpu_model.state_dict().items():  # BatchNorm running statistics included
        close(model.state_dict()[name], buf, name, 1e-5, 1e-6)


def _concat_head(head, features):
    """SegFormer's head as written: project, upsample, concatenate deepest first, fuse."""
    size = features[0].shape[2:]
    projected = []
    for i in reversed(range(len(features))):
        x = getattr(head, f"linear_c{i + 1}")(features[i])
        projected.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                         if x.shape[2:] != size else x)
    x = head.linear_fuse(torch.cat(projected, dim=1))
    return head.linear_pred(head.dropout(x))


def test_decoder_equals_the_concatenating_head_values_gradients_and_statistics(device):
    from afa.models.segformer_head import SegFormerHead

    torch.manual_seed(0)
    dims = (32, 64, 160, 256)
    head = SegFormerHead(dims, embed_dim=48, num_classes=9, dropout=0.0).to(device).train()
    reference = SegFormerHead(dims, embed_dim=48, num_classes=9, dropout=0.0).to(device).train()
    reference.load_state_dict(head.state_dict())
    # A 75 x 66 crop at AFA's strides 4, 8, 16, 16: stages 3 and 4 share a grid.
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(2, c, h, w, generator=g).to(device)
                for c, (h, w) in zip(dims, [(19, 17), (10, 9), (5, 5), (5, 5)])]
    out = head(features)
    expected = _concat_head(reference, features)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    # Float32 rounding relative to the largest gradient; the projection biases' gradients are 0
    # up to that rounding (train-mode BatchNorm removes any constant shift).
    scale = max(q.grad.abs().max().item() for q in reference.parameters())
    for (name, p), q in zip(head.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=2e-6 * scale, msg=name)
    for (name, b), c in zip(head.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)
    # update_statistics: the same running statistics, no output.
    stats = SegFormerHead(dims, embed_dim=48, num_classes=9).to(device).train()
    stats.load_state_dict(reference.state_dict())
    with torch.no_grad():
        stats.update_statistics(features)
        reference(features)
    for (name, b), c in zip(stats.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)
