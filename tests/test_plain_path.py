"""The optimised pseudo-label path equals a plain per-image reading of docs/method.md, steps 1-12.

The product batches the flip copies, runs fused attention where no affinity is needed, gathers only
the present classes, refines both background stacks in one PAR call and shifts views instead of
stacking neighbours. This file re-implements steps 2-11 the slow, literal way: one image, one scale,
one flip copy, one stack at a time, with explicit loops where the sizes allow. It then checks that
``afa.cam.multi_scale_cam`` + ``afa.pseudo_labels.compute_afa_losses`` with the paper's defaults
(PAR ``num_iter=10``, dilations (1, 2, 4, 8, 12, 24), thresholds 0.45 / 0.55 / 0.35, radius 8, loss
weights 0.1) give the same CAMs, affinity, pseudo labels and losses on a tiny random AFANet.

The product path runs on ``TORCH_DEVICE`` (see conftest), the plain path always on the CPU: on
a GPU this compares the device against a CPU reference, from the same training forward.

Tolerances: CAMs ``atol=1e-5`` (batched vs single forwards and fused vs explicit attention reorder
float32 sums; measured 1.3e-6), the largest scale's affinity ``atol=2e-5`` (measured 5e-6);
losses ``rtol=1e-5`` (measured <= 1.5e-7); every label map must be equal pixel for pixel (the
nearest CAM score to a threshold is 8e-6 away, six times the CAM difference). On another device
the tolerances are 10x wider (``device_tol``), and up to 0.1 % of the label entries may differ:
on the CPU, relative noise of 1e-5 on the CAMs, affinity, logits and image flipped one pixel of
the affinity pseudo label in one of three draws, 1e-6 none.
"""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_labels, device_tol

from afa.cam import multi_scale_cam
from afa.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from afa.models import PAR, AFANet
from afa.pseudo_labels import compute_afa_losses

# The paper's (VOC) settings, spelled out rather than taken from the product's defaults.
SCALES = (1.0, 0.5, 1.5)
BKG_SCORE, HIGH, LOW = 0.45, 0.55, 0.35
RADIUS = 8
DILATIONS = (1, 2, 4, 8, 12, 24)
PAR_ITERS = 10
W1, W2, W3 = 0.3, 0.3, 0.01
W_SEG, W_AFF = 0.1, 0.1
CAM_ITERS, AFF_SWITCH_ITER = 2000, 6000  # the paper's phases, given as the step's phase
DIRECTIONS = ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))

# 64 x 160: every scale's size is a multiple of 16 (32x80, 64x160, 96x240), the stage-4 grids are
# 4x10 (training forward) and 6x15 (largest CAM scale), both wider than the radius of 8, so the
# radius mask really drops pairs in steps 6 and 8.
HEIGHT, WIDTH = 64, 160
NUM_CLASSES = 5  # background + 4
LABELS = ((0.0, 1.0, 0.0, 1.0),  # image 0: two classes
          (0.0, 0.0, 1.0, 0.0))  # image 1: one class
BOXES = ((0, 64, 0, 160),  # image 0: the whole crop is content
         (8, 56, 16, 128))  # image 1: padded on all four sides (even sizes: half resolution exact)


# ----------------------------------------------------------------------------------------------
# The plain path, one image at a time.
# ----------------------------------------------------------------------------------------------

def plain_multi_scale_cam(model, x):
    """Step 2 for one image x (1, 3, H, W): (C-1, H, W) normalised CAM, (N, N) largest-scale aff."""
    _, _, height, width = x.shape
    total = 0
    for scale in SCALES:
        scaled = F.interpolate(x, size=(int(scale * height), int(scale * width)), mode="bilinear",
                               align_corners=False)
        cam, aff = model.forward_cam(scaled, return_aff=True)
        cam_of_flip, _ = model.forward_cam(scaled.flip(-1), return_aff=True)
        cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)
        cam_of_flip = F.interpolate(cam_of_flip, size=(height, width), mode="bilinear",
                                    align_corners=False).flip(-1)
        total = total + F.relu(torch.maximum(cam, cam_of_flip))[0]
        if scale == max(SCALES):
            largest_aff = aff[0]  # the un-flipped copy
    normalised = torch.empty_like(total)
    for c in range(total.shape[0]):
        shifted = total[c] - total[c].min()
        normalised[c] = shifted / (shifted.max() + 1e-5)
    return normalised, largest_aff


def plain_cam_label(cam, y, box):
    """Step 3 (logging variant): (H, W) label from one image's CAM (C-1, H, W)."""
    masked = cam * y[:, None, None]
    score = masked.max(dim=0).values
    label = masked.argmax(dim=0) + 1
    label[score <= BKG_SCORE] = 0
    return outside_box_is_ignore(label, box)


def outside_box_is_ignore(label, box):
    y0, y1, x0, x1 = box
    inside = torch.zeros_like(label, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    return torch.where(inside, label, torch.full_like(label, IGNORE_INDEX))


def combine_high_low(label_high, label_low):
    """Steps 4 and 9: the high label; its background is ignore unless the low label agrees."""
    label = label_high.clone()
    label[label_high == 0] = IGNORE_INDEX
    label[(label_high == 0) & (label_low == 0)] = 0
    return label


def shifted(x, dy, dx):
    """x (K, H, W) read at (y + dy, x + dx), coordinates clamped to the image: replicate padding."""
    _, height, width = x.shape
    rows = (torch.arange(height) + dy).clamp(0, height - 1)
    cols = (torch.arange(width) + dx).clamp(0, width - 1)
    return x[:, rows][:, :, cols]


def plain_par(rgb, masks):
    """Step 5 for one image: rgb (3, H, W) in [0, 1], masks (K, h, w) -> (K, H, W)."""
    _, height, width = rgb.shape
    offsets = [(dy * d, dx * d) for d in DILATIONS for dy, dx in DIRECTIONS]  # 48 neighbours

    def neighbours(x):  # (K, H, W) -> (K, 48, H, W)
        return torch.stack([shifted(x, dy, dx) for dy, dx in offsets], dim=1)

    rgb_nbrs = neighbours(rgb)  # (3, 48, H, W)
    sigma = rgb_nbrs.std(dim=1, keepdim=True)  # (3, 1, H, W), unbiased, per channel
    k_rgb = -((rgb_nbrs - rgb[:, None]).abs() / (sigma + 1e-8) / W1) ** 2
    k_rgb = k_rgb.mean(dim=0)  # (48, H, W): averaged over the colour channels
    dist = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets])  # d or sqrt(2) d
    # torch.std is the unbiased estimate, as for sigma_i (docs/method.md: "the standard
    # deviation" here).
    k_pos = -(dist / (dist.std() + 1e-8) / W2) ** 2
    alpha = k_rgb.softmax(dim=0) + W3 * k_pos.softmax(dim=0)[:, None, None]  # (48, H, W)

    m = F.interpolate(masks[None], size=(height, width), mode="bilinear", align_corners=True)[0]
    for _ in range(PAR_ITERS):
        m = (neighbours(m) * alpha[None]).sum(dim=1)
    return m


def plain_refined_label(cam, y, rgb, box):
    """Step 4 for one image: PAR at half resolution on bkg + present-class softmax stacks."""
    _, height, width = cam.shape
    half = (height // 2, width // 2)
    keys = [0] + [c + 1 for c in range(len(y)) if y[c] > 0]  # class ids of the stack's channels
    small_rgb = F.interpolate(rgb[None], size=half, mode="bilinear", align_corners=False)[0]
    small_cam = F.interpolate(cam[None], size=half, mode="bilinear", align_corners=False)[0]
    labels = []
    for bkg_score in (HIGH, LOW):
        stack = torch.cat([torch.full((1, *half), bkg_score), small_cam[[k - 1 for k in keys[1:]]]])
        refined = plain_par(small_rgb, stack.softmax(dim=0))
        refined = F.interpolate(refined[None], size=(height, width), mode="bilinear",
                                align_corners=False)[0]
        labels.append(torch.tensor(keys)[refined.argmax(dim=0)])
    return outside_box_is_ignore(combine_high_low(*labels), box)


def chebyshev_within_radius(i, j, grid_width):
    (yi, xi), (yj, xj) = divmod(i, grid_width), divmod(j, grid_width)
    return max(abs(yi - yj), abs(xi - xj)) <= RADIUS


def plain_affinity_label(label, grid):
    """Step 6 for one image: (N, N) targets from the (H, W) refined pseudo label."""
    small = F.interpolate(label[None, None].float(), size=grid, mode="nearest")[0, 0]
    small = small.long().flatten().tolist()
    n = len(small)
    target = torch.full((n, n), IGNORE_INDEX, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            if not chebyshev_within_radius(i, j, grid[1]):
                continue
            if small[i] == IGNORE_INDEX or small[j] == IGNORE_INDEX:
                continue
            target[i, j] = 1 if small[i] == small[j] else 0
    return target


def plain_random_walk(cam, y, aff, bkg_score):
    """Step 8 for one image: (1 + P, H, W) propagated bkg + present-class scores."""
    _, height, width = cam.shape
    grid = (int(height * max(SCALES)) // 16, int(width * max(SCALES)) // 16)
    n = grid[0] * grid[1]
    assert aff.shape == (n, n)
    present = [c for c in range(len(y)) if y[c] > 0]
    small = F.interpolate((cam * y[:, None, None])[None], size=grid, mode="bilinear",
                          align_corners=False)[0]
    scores = torch.cat([torch.full((1, *grid), bkg_score), small[present]])
    scores = scores.flatten(1).softmax(dim=0)  # (1 + P, N)
    inside = torch.tensor([[chebyshev_within_radius(i, j, grid[1]) for j in range(n)]
                           for i in range(n)])
    trans = torch.where(inside, aff, torch.zeros_like(aff)) ** 2
    trans = trans / (trans.sum(dim=0, keepdim=True) + 0.1)  # each column j over its i
    walked = scores @ trans  # walked[c, j] = sum_i scores[c, i] trans[i, j]
    walked = walked.view(-1, *grid)
    return F.interpolate(walked[None], size=(height, width), mode="bilinear",
                         align_corners=False)[0]


def plain_aff_pseudo_label(walked_high, walked_low, y, rgb, box):
    """Step 9 for one image: PAR on the box crop of the propagated maps, no re-softmax."""
    y0, y1, x0, x1 = box
    keys = torch.tensor([0] + [c + 1 for c in range(len(y)) if y[c] > 0])
    crop_rgb = rgb[:, y0:y1, x0:x1]
    half = ((y1 - y0) // 2, (x1 - x0) // 2)
    small_rgb = F.interpolate(crop_rgb[None], size=half, mode="bilinear", align_corners=False)[0]
    labels = []
    for walked in (walked_high, walked_low):
        refined = plain_par(small_rgb, walked[:, y0:y1, x0:x1])
        refined = F.interpolate(refined[None], size=(y1 - y0, x1 - x0), mode="bilinear",
                                align_corners=False)[0]
        labels.append(keys[refined.argmax(dim=0)])
    label = torch.full(rgb.shape[1:], IGNORE_INDEX, dtype=torch.long)
    label[y0:y1, x0:x1] = combine_high_low(*labels)
    return label


def plain_path(model, x, rgb, labels, boxes, cls_logits, seg_logits, aff_pred):
    """Steps 2-10 per image; the batch losses of steps 7 and 10 from per-image sums."""
    _, _, height, width = x.shape
    grid = (height // 16, width // 16)
    out = {key: [] for key in ("cam", "cam_aff", "cam_label", "refined_label", "aff_label",
                               "aff_pseudo_label")}
    cls_loss = 0.0
    aff_sums = {"pos": 0.0, "n_pos": 0, "neg": 0.0, "n_neg": 0}
    for b in range(x.shape[0]):
        y, box = labels[b], boxes[b]
        cam, cam_aff = plain_multi_scale_cam(model, x[b:b + 1])
        refined = plain_refined_label(cam, y, rgb[b], box)
        aff_label = plain_affinity_label(refined, grid)
        walked_high = plain_random_walk(cam, y, cam_aff, HIGH)
        walked_low = plain_random_walk(cam, y, cam_aff, LOW)
        out["cam"].append(cam)
        out["cam_aff"].append(cam_aff)
        out["cam_label"].append(plain_cam_label(cam, y, box))
        out["refined_label"].append(refined)
        out["aff_label"].append(aff_label)
        out["aff_pseudo_label"].append(plain_aff_pseudo_label(walked_high, walked_low, y,
                                                              rgb[b], box))
        cls_loss = cls_loss + F.multilabel_soft_margin_loss(cls_logits[b:b + 1], y[None])
        # Step 7 averages positive and negative pairs over the whole batch.
        pos, neg = aff_label == 1, aff_label == 0
        aff_sums["pos"] += (1 - aff_pred[b])[pos].sum()
        aff_sums["n_pos"] += int(pos.sum())
        aff_sums["neg"] += aff_pred[b][neg].sum()
        aff_sums["n_neg"] += int(neg.sum())
    out = {key: torch.stack(value) for key, value in out.items()}
    out["cls_loss"] = cls_loss / x.shape[0]
    out["aff_loss"] = (0.5 * aff_sums["pos"] / (aff_sums["n_pos"] + 1)
                       + 0.5 * aff_sums["neg"] / (aff_sums["n_neg"] + 1))
    for name in ("refined_label", "aff_pseudo_label"):
        out[f"seg_loss_{name}"] = plain_balanced_seg_loss(seg_logits, out[name])
    return out


def plain_balanced_seg_loss(seg_logits, target):
    """Step 10: mean of the batch's background-pixel CE and foreground-pixel CE."""
    sums = {"bkg": 0.0, "fg": 0.0}
    counts = {"bkg": 0, "fg": 0}
    for b in range(target.shape[0]):
        logits = F.interpolate(seg_logits[b:b + 1], size=target.shape[-2:], mode="bilinear",
                               align_corners=False)[0]
        ce = F.cross_entropy(logits[None], target[b:b + 1], ignore_index=IGNORE_INDEX,
                             reduction="none")[0]  # (H, W), 0 on ignore pixels
        for part, where in (("bkg", target[b] == 0),
                            ("fg", (target[b] != 0) & (target[b] != IGNORE_INDEX))):
            sums[part] += ce[where].sum()
            counts[part] += int(where.sum())
    # docs/method.md leaves an empty part open (the product counts it as 0); this batch has
    # both parts.
    assert counts["bkg"] > 0 and counts["fg"] > 0
    return 0.5 * (sums["bkg"] / counts["bkg"] + sums["fg"] / counts["fg"])


def plain_total(out, iteration):
    """Steps 10-11: pick the seg target, weight the joint losses after cam_iters."""
    target = "refined_label" if iteration < AFF_SWITCH_ITER else "aff_pseudo_label"
    seg_loss = out[f"seg_loss_{target}"]
    if iteration < CAM_ITERS:
        return out[target], seg_loss, out["cls_loss"]
    return out[target], seg_loss, out["cls_loss"] + W_SEG * seg_loss + W_AFF * out["aff_loss"]


# ----------------------------------------------------------------------------------------------
# The comparison.
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paths(device):
    return run_both_paths(device)


def run_both_paths(device):
    """The product path on ``device``, the plain path on the CPU; product tensors are returned
    on the CPU."""
    torch.manual_seed(0)
    model = AFANet(backbone="mit_b0", num_classes=NUM_CLASSES, embedding_dim=32, pretrained=None,
                   drop_path_rate=0.0).eval()
    with torch.no_grad():
        # An untrained affinity head says ~0.5 for every pair: one random-walk step then averages
        # the whole image and step 9 labels everything ignore. A sharper head (near 0 except for
        # similar tokens, as after training) gives affinity pseudo labels with every kind of value.
        model.attn_proj.weight.mul_(10.0)
        model.attn_proj.bias.mul_(10.0).sub_(10.0)
    # Random 8x8-pixel colour patches plus grain, so tokens and PAR's colour kernel see regions;
    # padding is 0 in [0, 1] RGB, as the random crop pads before normalisation.
    rgb = F.interpolate(torch.rand(2, 3, HEIGHT // 8, WIDTH // 8), size=(HEIGHT, WIDTH),
                        mode="nearest")
    rgb = (rgb + 0.1 * torch.rand_like(rgb)).clamp(0, 1)
    for b, (y0, y1, x0, x1) in enumerate(BOXES):
        inside = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        rgb[b] *= inside
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (rgb * 255 - mean) / std
    labels = torch.tensor(LABELS)
    boxes = torch.tensor(BOXES)

    on_device = copy.deepcopy(model).to(device)
    x_dev, rgb_dev, labels_dev, boxes_dev = (t.to(device) for t in (x, rgb, labels, boxes))
    with torch.no_grad():
        forward = on_device(x_dev)  # step 1, shared by both paths
        product_cam = multi_scale_cam(on_device, x_dev, scales=SCALES)
        product = {iteration: compute_afa_losses(
            forward.cls_logits, forward.seg_logits, forward.aff_pred, product_cam.cam,
            product_cam.aff, (forward.grid, product_cam.aff_grid), rgb_dev, labels_dev,
            boxes_dev, par=PAR().to(device), joint=iteration >= CAM_ITERS,
            affinity_target=iteration >= AFF_SWITCH_ITER)
            for iteration in (CAM_ITERS - 1, CAM_ITERS, AFF_SWITCH_ITER)}
        plain = plain_path(model, x, rgb, labels, [list(box) for box in BOXES],
                           forward.cls_logits.cpu(), forward.seg_logits.cpu(),
                           forward.aff_pred.cpu())
    product_cam = product_cam._replace(cam=product_cam.cam.cpu(), aff=product_cam.aff.cpu())
    product = {iteration: dataclasses.replace(terms, **{
        f.name: getattr(terms, f.name).cpu() for f in dataclasses.fields(terms)
        if getattr(terms, f.name) is not None}) for iteration, terms in product.items()}
    return product_cam, product, plain



def test_cams_and_largest_scale_affinity_match(paths, device):
    product_cam, _, plain = paths
    assert product_cam.cam.shape == plain["cam"].shape == (2, NUM_CLASSES - 1, HEIGHT, WIDTH)
    torch.testing.assert_close(product_cam.cam, plain["cam"], **device_tol(device, 0, 1e-5))
    assert product_cam.aff.shape == plain["cam_aff"].shape == (2, 6 * 15, 6 * 15)
    # The affinity head is sharpened 10x (see run_both_paths), which scales the float32 noise of
    # the attention logits by up to 2.5; measured 5e-6, hence 2e-5 here.
    torch.testing.assert_close(product_cam.aff, plain["cam_aff"], **device_tol(device, 0, 2e-5))


def test_pseudo_labels_match_pixel_for_pixel(paths, device):
    _, product, plain = paths
    terms = product[CAM_ITERS]
    for name in ("cam_label", "refined_label", "aff_pseudo_label", "aff_label"):
        assert_same_labels(getattr(terms, name), plain[name], device, name)
    # The comparison means something: each map holds background, every present class and (in
    # the PAR-refined ones) ignore inside the box; the padding is ignore; the radius drops pairs
    # of the 4x10 grid.
    y0, y1, x0, x1 = BOXES[1]
    assert (plain["cam_label"][1, y0:y1, x0:x1] != IGNORE_INDEX).all()
    for name in ("cam_label", "refined_label", "aff_pseudo_label"):
        label = plain[name]
        kinds = {0, 2, 4} if name == "cam_label" else {0, 2, 4, IGNORE_INDEX}
        assert set(label[0].unique().tolist()) == kinds, name
        kinds = {0, 3} if name == "cam_label" else {0, 3, IGNORE_INDEX}
        assert set(label[1, y0:y1, x0:x1].unique().tolist()) == kinds, name
        outside = torch.ones(HEIGHT, WIDTH, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert (label[1][outside] == IGNORE_INDEX).all(), name
    assert set(plain["aff_label"].unique().tolist()) == {0, 1, IGNORE_INDEX}
    small = F.interpolate(plain["refined_label"][:, None].float(), size=(4, 10),
                          mode="nearest").flatten(1)  # (B, 40)
    both_valid = (small[:, :, None] != IGNORE_INDEX) & (small[:, None, :] != IGNORE_INDEX)
    columns = torch.arange(40) % 10
    beyond = (columns[:, None] - columns[None, :]).abs() > RADIUS
    assert (both_valid & beyond).any()


@pytest.mark.parametrize("iteration", [CAM_ITERS - 1, CAM_ITERS, AFF_SWITCH_ITER])
def test_losses_and_seg_target_match(paths, iteration, device):
    _, product, plain = paths
    terms = product[iteration]
    target, seg_loss, total = plain_total(plain, iteration)
    assert_same_labels(terms.seg_target, target, device, "seg_target")
    for name, mine in (("cls_loss", plain["cls_loss"]), ("aff_loss", plain["aff_loss"]),
                       ("seg_loss", seg_loss), ("total", total)):
        torch.testing.assert_close(getattr(terms, name), mine, **device_tol(device, 1e-5, 0),
                                   msg=name)
    assert terms.reg_loss == 0
    if iteration < CAM_ITERS:
        assert terms.total == terms.cls_loss
    else:
        assert terms.total > terms.cls_loss
    # The two targets differ, so the switch at aff_switch_iter is visible in the seg loss.
    assert plain["seg_loss_refined_label"] != plain["seg_loss_aff_pseudo_label"]
