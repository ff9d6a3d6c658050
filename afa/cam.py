"""Class activation maps and the pseudo labels derived from them.

docs/method.md: multi-scale CAM (step 2), CAM label (step 3), PAR-refined pseudo label
(step 4) and the affinity pseudo label from propagated CAMs (step 9).

Box convention: ``boxes`` is (B, 4) integer ``[y0, y1, x0, x1]``, half-open, in pixels of the
(H, W) crop: ``crop[y0:y1, x0:x1]`` is image content, the rest is padding (the same convention as
``afa.data.transforms.random_crop``). Every label built here is ``ignore_index`` outside the box.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from afa.constants import IGNORE_INDEX

__all__ = [
    "MultiScaleCAM",
    "ParJob",
    "present_classes",
    "cam_par_job",
    "cam_par_label",
    "run_par",
    "walk_par_job",
    "walk_par_label",
    "multi_scale_cam",
    "box_mask",
    "cam_to_label",
    "refine_cams_with_par",
    "refine_propagated_cams",
]


class MultiScaleCAM(NamedTuple):
    cam: torch.Tensor  # (B, C-1, H, W) normalised to [0, 1] per image and class
    aff: torch.Tensor | None  # (B, N, N) affinity of the ``aff_scale`` forward, N = h * w
    aff_grid: tuple[int, int] | None  # (h, w) stage-4 grid of that forward, from the encoder
    # (B, C-1) image-level logits of the un-flipped scale-1 copy; None without a 1.0 scale or
    # when the model's CAM forward gives none. What ``model(images, cls_only=True)`` would give,
    # up to float rounding (the copy ran in a batch with its flip).
    cls_logits: torch.Tensor | None = None


@torch.no_grad()
def multi_scale_cam(model: nn.Module, images: torch.Tensor,
                    scales: Sequence[float] = (1.0, 0.5, 1.5), *,
                    aff_scale: float | None = None, scale1=None,
                    update_decoder_bn: bool = False, with_aff: bool = True) -> MultiScaleCAM:
    """Multi-scale + flip CAM (docs/method.md, step 2), and the affinity of one of its scales.

    Args:
        model: exposes ``forward_cam(x, return_aff) -> CAMForward`` (``afa.models.AFANet``) and,
            with ``update_decoder_bn``, ``decoder``.
        images: (B, 3, H, W) normalised images.
        scales: resize factors (``int(s * H), int(s * W)``, bilinear).
        aff_scale: the scale whose affinity is returned: the largest by default (training);
            validation takes 1.0. Only that scale computes explicit attention.
        scale1: an ``AFAOutput`` of a forward already run on ``images``: its ``cam_logits``,
            ``aff_pred`` and ``grid`` serve as the un-flipped scale-1 copy instead of running it
            again (``cam.reuse_train_forward``, and validation); only the flip is run. Equal to
            the second forward when the model is deterministic (eval mode, or no drop-path).
        update_decoder_bn: also run the decoder on each scale's (image, flip) batch, as the
            authors' CAM forwards run the whole network. In train mode this updates the decoder's
            BatchNorm running statistics (once per scale and iteration) exactly as theirs do;
            its outputs are discarded. Not with ``scale1``, whose decoder saw no flip.
        with_aff: False: no affinity at all (``aff`` and ``aff_grid`` None), every forward on
            the fused attention kernel; for CAM forwards run only for ``update_decoder_bn``.

    The model is called in whatever mode it is in; the caller decides train/eval.
    """
    if aff_scale is None:
        aff_scale = max(scales)
    if aff_scale not in scales:
        raise ValueError(f"aff_scale {aff_scale} is not one of the CAM scales {tuple(scales)}")
    if update_decoder_bn and scale1 is not None:
        raise ValueError("update_decoder_bn needs the decoder to see each scale with its flip; "
                         "a reused scale-1 forward (scale1) did not")
    batch, _, height, width = images.shape
    cam_sum = images.new_zeros(())
    aff, grid, cls_logits = None, None, None
    for scale in scales:
        size = (int(scale * height), int(scale * width))
        x = images if size == (height, width) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=False)
        want_aff = with_aff and scale == aff_scale and aff is None
        if scale1 is not None and scale == 1.0:
            flipped = model.forward_cam(x.flip(-1), return_aff=False)
            cam = torch.cat([scale1.cam_logits.detach().to(flipped.cam.dtype), flipped.cam])
            cls_logits = scale1.cls_logits.detach()
            if want_aff:
                aff, grid = scale1.aff_pred.detach(), scale1.grid
        elif want_aff:
            # Explicit attention (for the affinity) on the un-flipped copies only: the flipped
            # ones run fused, which halves the largest transient of the training iteration.
            plain = model.forward_cam(x, return_aff=True)
            flipped = model.forward_cam(x.flip(-1), return_aff=False)
            cam = torch.cat([plain.cam, flipped.cam], dim=0)
            aff, grid = plain.aff, plain.grid
            if scale == 1.0:
                cls_logits = plain.cls_logits
            if update_decoder_bn:  # one (image, flip) batch, as one forward of both would be
                model.decoder.update_statistics(
                    [torch.cat(pair) for pair in zip(plain.features, flipped.features)])
        else:
            both = model.forward_cam(torch.cat([x, x.flip(-1)], dim=0), return_aff=False)
            cam = both.cam
            if scale == 1.0 and both.cls_logits is not None:
                cls_logits = both.cls_logits[:batch]
            if update_decoder_bn:
                model.decoder.update_statistics(both.features)
        cam = F.interpolate(cam.float(), size=(height, width), mode="bilinear", align_corners=False)
        cam = torch.maximum(cam[:batch], cam[batch:].flip(-1))  # (B, C-1, H, W)
        cam_sum = cam_sum + F.relu(cam)
    cam_sum = cam_sum - cam_sum.amin(dim=(2, 3), keepdim=True)
    cam_sum = cam_sum / (cam_sum.amax(dim=(2, 3), keepdim=True) + 1e-5)
    return MultiScaleCAM(cam=cam_sum, aff=aff, aff_grid=grid, cls_logits=cls_logits)


def host_to_device(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host ``values`` (a nested sequence or a CPU tensor) on ``device``. To a GPU through pinned
    memory, asynchronously: a copy from pageable memory would make the host wait for the GPU's
    queue to drain."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def box_mask(boxes: torch.Tensor, height: int, width: int,
             device: torch.device | str | None = None) -> torch.Tensor:
    """(B, H, W) bool on ``device`` (default: that of ``boxes``), True inside each box.

    Boxes are ``[y0, y1, x0, x1]``, half-open.
    """
    boxes = boxes.to(device=device, dtype=torch.long)
    ys = torch.arange(height, device=boxes.device)
    xs = torch.arange(width, device=boxes.device)
    inside_y = (ys[None, :] >= boxes[:, 0:1]) & (ys[None, :] < boxes[:, 1:2])  # (B, H)
    inside_x = (xs[None, :] >= boxes[:, 2:3]) & (xs[None, :] < boxes[:, 3:4])  # (B, W)
    return inside_y[:, :, None] & inside_x[:, None, :]


def cam_to_label(cam: torch.Tensor, labels: torch.Tensor, bkg_score: float = 0.45,
                 high: float | None = None, low: float | None = None,
                 boxes: torch.Tensor | None = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Hard label from CAMs (docs/method.md, step 3).

    Args:
        cam: (B, C-1, H, W) normalised CAMs.
        labels: (B, C-1) multi-hot image labels; CAMs of absent classes are zeroed.
        bkg_score: background where the best class score is ``<= bkg_score``.
        high, low: the training variant (give both): ``<= high`` is ignore, ``<= low`` background,
            overriding ``bkg_score``.
        boxes: (B, 4) valid region; outside it the label is ``ignore_index``.

    Returns:
        (B, H, W) long: 0 background, c for class c (1-based), ``ignore_index``.
    """
    if (high is None) != (low is None):
        raise ValueError("give both `high` and `low` (the training variant) or neither")
    score, index = (cam * labels[:, :, None, None]).max(dim=1)  # (B, H, W)
    # masked_fill rather than boolean indexing: no device sync.
    label = (index + 1).masked_fill(score <= bkg_score, 0)
    if high is not None:
        label = label.masked_fill(score <= high, ignore_index).masked_fill(score <= low, 0)
    if boxes is not None:
        outside = ~box_mask(boxes, *label.shape[-2:], device=label.device)
        label = label.masked_fill(outside, ignore_index)
    return label


def _combine_high_low(label_high: torch.Tensor, label_low: torch.Tensor,
                      ignore_index: int) -> torch.Tensor:
    """Foreground where the high-background label has it; background only where both agree."""
    background = label_high == 0
    return label_high.masked_fill(background, ignore_index).masked_fill(
        background & (label_low == 0), 0)


def present_classes(labels: torch.Tensor,
                     count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel ids of background + present classes per image, padded to the batch maximum.

    Returns ``index`` (B, 1 + P) long into the (B, C) background-first channel axis (padding
    points at 0) and ``valid`` (B, 1 + P) bool. Refining only these channels keeps PAR's cost
    proportional to the few classes an image has, not to C. ``count``: P, the largest number of
    classes of an image, if the caller knows it (otherwise read from ``labels``: a device sync).
    """
    present = labels.bool()  # (B, C-1)
    if count is None:
        count = int(present.sum(dim=1).max()) if present.numel() else 0
    # A stable sort puts the present classes first, in increasing class order.
    order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices[:, :count]
    valid = torch.gather(present, 1, order)  # (B, P)
    index = torch.where(valid, order + 1, torch.zeros_like(order))
    index = F.pad(index, (1, 0), value=0)
    valid = F.pad(valid, (1, 0), value=True)
    return index, valid


class ParJob(NamedTuple):
    """Inputs of one PAR call, at the PAR resolution; several jobs can share one call."""

    rgb: torch.Tensor  # (n, 3, h, w) images in [0, 1], each at the top left of the canvas
    stack: torch.Tensor  # (n, K, h, w) score maps to refine
    bounds: list[tuple[int, int]]  # (height, width) of each image's region on the canvas


def run_par(par: nn.Module, jobs: Sequence[ParJob]) -> list[torch.Tensor]:
    """Refine several jobs in one PAR call (``PAR(..., bounds=...)``); one output per job.

    Each job's rows are padded to the largest canvas and channel count among the jobs; every
    region is refined as if alone (the padding never enters a neighbourhood), so this equals one
    call per job. Returns each job's (n, K, h, w) refined maps on its own canvas.
    """
    height = max(j.rgb.shape[-2] for j in jobs)
    width = max(j.rgb.shape[-1] for j in jobs)
    channels = max(j.stack.shape[1] for j in jobs)

    def pad(x: torch.Tensor, extra_channels: int = 0) -> torch.Tensor:
        return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2], 0, extra_channels))

    rgb = torch.cat([pad(j.rgb) for j in jobs])
    stack = torch.cat([pad(j.stack, channels - j.stack.shape[1]) for j in jobs])
    bounds = host_to_device([b for j in jobs for b in j.bounds], rgb.device)
    refined = par(rgb, stack, bounds=bounds).split([len(j.bounds) for j in jobs])
    return [r[:, :j.stack.shape[1], :j.rgb.shape[-2], :j.rgb.shape[-1]]
            for r, j in zip(refined, jobs)]


def cam_par_job(rgb: torch.Tensor, cams: torch.Tensor,
                present: tuple[torch.Tensor, torch.Tensor], high: float, low: float,
                down_scale: int = 2) -> ParJob:
    """The PAR input of :func:`refine_cams_with_par`; ``present`` is ``present_classes``'s."""
    height, width = cams.shape[-2:]
    small = (height // down_scale, width // down_scale)
    small_rgb = F.interpolate(rgb, size=small, mode="bilinear", align_corners=False)
    small_cams = F.interpolate(cams, size=small, mode="bilinear", align_corners=False)
    index, valid = present  # (B, 1 + P)
    # Background-first scores; the background row is replaced by the constant of each stack.
    scores = F.pad(small_cams, (0, 0, 0, 0, 1, 0))  # (B, C, h, w)
    scores = torch.gather(scores, 1, index[:, :, None, None].expand(-1, -1, *small))
    stacks = []
    for bkg_score in (high, low):
        stack = scores.clone()
        stack[:, 0].fill_(bkg_score)
        stacks.append(stack.masked_fill(~valid[:, :, None, None], float("-inf")).softmax(dim=1))
    return ParJob(small_rgb, torch.cat(stacks, dim=1), [small] * len(cams))


def cam_par_label(refined: torch.Tensor, index: torch.Tensor, boxes: torch.Tensor,
                  size: tuple[int, int], ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The label of :func:`refine_cams_with_par` from PAR's output on :func:`cam_par_job`."""
    batch = refined.shape[0]
    refined = F.interpolate(refined, size=size, mode="bilinear", align_corners=False)
    # max(dim).indices picks the first maximum as argmax does, and is 7-40x faster on CPU.
    label_high, label_low = (
        torch.gather(index, 1, part.max(dim=1).indices.flatten(1)).view(batch, *size)
        for part in refined.chunk(2, dim=1))
    label = _combine_high_low(label_high, label_low, ignore_index)
    return label.masked_fill(~box_mask(boxes, *size, device=label.device), ignore_index)


@torch.no_grad()
def refine_cams_with_par(par: nn.Module, rgb: torch.Tensor, cams: torch.Tensor,
                         labels: torch.Tensor, boxes: torch.Tensor, high: float = 0.55,
                         low: float = 0.35, ignore_index: int = IGNORE_INDEX,
                         down_scale: int = 2, *, max_present: int | None = None) -> torch.Tensor:
    """PAR-refined pseudo label from CAMs (docs/method.md, step 4), all images of the batch at once.

    Args:
        par: a ``PAR`` module.
        rgb: (B, 3, H, W) image in [0, 1].
        cams: (B, C-1, H, W) normalised CAMs.
        labels: (B, C-1) multi-hot image labels.
        boxes: (B, 4) valid regions ``[y0, y1, x0, x1]``.
        high, low: constant background scores of the two stacks.
        down_scale: PAR runs at (H // down_scale, W // down_scale).
        max_present: the largest number of classes of an image, if known on the host (see
            ``refine_propagated_cams``).

    Returns:
        (B, H, W) long pseudo label with ``ignore_index``.
    """
    present = present_classes(labels, max_present)
    job = cam_par_job(rgb, cams, present, high, low, down_scale)
    refined = par(job.rgb, job.stack)  # (B, 2 (1 + P), h, w)
    return cam_par_label(refined, present[0], boxes, cams.shape[-2:], ignore_index)


class WalkParJob(NamedTuple):
    job: ParJob | None  # None when every box is empty
    crops: list[tuple[int, tuple[int, int, int, int]]]  # (image, box) of each row
    index: torch.Tensor  # (B, 1 + P) channel ids
    valid: torch.Tensor  # (B, 1 + P)


def walk_par_job(rgb: torch.Tensor, walked_high: torch.Tensor, walked_low: torch.Tensor,
                 present: tuple[torch.Tensor, torch.Tensor], box_list: Sequence[Sequence[int]],
                 down_scale: int = 2) -> WalkParJob:
    """The PAR input of :func:`refine_propagated_cams`: each box crop at 1 / ``down_scale``;
    ``present`` is ``present_classes``'s."""
    index, valid = present
    crops = [(b, (y0, y1, x0, x1)) for b, (y0, y1, x0, x1) in enumerate(box_list)
             if y1 > y0 and x1 > x0]  # a crop of padding only has nothing to label
    if not crops:
        return WalkParJob(None, crops, index, valid)
    smalls = [(max(1, (y1 - y0) // down_scale), max(1, (x1 - x0) // down_scale))
              for _, (y0, y1, x0, x1) in crops]
    canvas = (max(h for h, _ in smalls), max(w for _, w in smalls))
    small_rgb, stacks = [], []
    for (b, (y0, y1, x0, x1)), small in zip(crops, smalls):
        keys = index[b]  # background + present classes, padded with 0 (masked in the label)
        stack = torch.cat([walked_high[b:b + 1, keys, y0:y1, x0:x1],
                           walked_low[b:b + 1, keys, y0:y1, x0:x1]], dim=1)
        # What PAR does to its input, done per crop so that all crops fit one canvas.
        stack = F.interpolate(stack, size=small, mode="bilinear", align_corners=True)
        crop_rgb = F.interpolate(rgb[b:b + 1, :, y0:y1, x0:x1], size=small, mode="bilinear",
                                 align_corners=False)
        pad = (0, canvas[1] - small[1], 0, canvas[0] - small[0])
        small_rgb.append(F.pad(crop_rgb, pad))
        stacks.append(F.pad(stack, pad))
    return WalkParJob(ParJob(torch.cat(small_rgb), torch.cat(stacks), smalls), crops, index,
                      valid)


def walk_par_label(refined: torch.Tensor | None, work: WalkParJob, size: tuple[int, int],
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The label of :func:`refine_propagated_cams` from PAR's output on :func:`walk_par_job`."""
    batch = work.index.shape[0]
    label = torch.full((batch, *size), ignore_index, dtype=torch.long, device=work.index.device)
    for i, (b, (y0, y1, x0, x1)) in enumerate(work.crops):
        small_h, small_w = work.job.bounds[i]
        out = F.interpolate(refined[i:i + 1, :, :small_h, :small_w], size=(y1 - y0, x1 - x0),
                            mode="bilinear", align_corners=False)
        invalid = ~work.valid[b, None, :, None, None]
        label_high, label_low = (
            work.index[b][part.masked_fill(invalid, float("-inf")).max(dim=1).indices]
            for part in out.chunk(2, dim=1))
        label[b:b + 1, y0:y1, x0:x1] = _combine_high_low(label_high, label_low, ignore_index)
    return label


@torch.no_grad()
def refine_propagated_cams(par: nn.Module, rgb: torch.Tensor, walked_high: torch.Tensor,
                           walked_low: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor,
                           ignore_index: int = IGNORE_INDEX, down_scale: int = 2, *,
                           box_list: Sequence[Sequence[int]] | None = None,
                           max_present: int | None = None) -> torch.Tensor:
    """Affinity pseudo label: PAR on random-walk-propagated maps (docs/method.md, step 9).

    Args:
        par: a ``PAR`` module.
        rgb: (B, 3, H, W) image in [0, 1].
        walked_high, walked_low: (B, C, H, W) outputs of ``afa.affinity.propagate_cams`` with
            ``high`` and ``low`` as background score (channel 0 background).
        labels: (B, C-1) multi-hot image labels.
        boxes: (B, 4) valid regions ``[y0, y1, x0, x1]``.
        down_scale: PAR runs on the box crop at 1 / ``down_scale`` of its size.
        box_list, max_present: ``boxes.tolist()`` and the largest number of classes of an
            image, when the caller has them on the host (the trainer reads them from the CPU
            batch): on a GPU, computing them here would wait for the device.

    Each image is refined on its own box crop, so padding never enters PAR's neighbourhoods; the
    propagated maps are not re-normalised. The crops of all images go through one PAR call
    (``PAR(..., bounds=...)``, equal to one call per crop).

    Returns:
        (B, H, W) long pseudo label with ``ignore_index``.
    """
    if box_list is None:
        box_list = boxes.tolist()
    work = walk_par_job(rgb, walked_high, walked_low, present_classes(labels, max_present),
                        box_list, down_scale)
    refined = run_par(par, [work.job])[0] if work.job is not None else None
    return walk_par_label(refined, work, walked_high.shape[-2:], ignore_index)
