"""The regularized loss's bilateral filter in PyTorch (afa.permutohedral, loss.reg_backend=torch)
against pydensecrf2's lattice, the reference: the filter, the loss and its gradient on real photo
crops of odd sizes and on random inputs, all-ignore crops and a batch of different boxes; and the
trainer's choice of backend, written to train.log.

On the CPU the two agree bit for bit (the same float32 operations in the same order); on a GPU
(``TORCH_DEVICE=cuda``) the splat's atomic additions sum in another order.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import afa.losses
from afa.cam import box_mask
from afa.config import ConfigError
from afa.engine.trainer import reg_backend, train
from afa.losses import DenseCRFLoss, bilateral_filter, time_filter
from afa.permutohedral import bilateral_features, bilateral_filter_torch, lattice_filter
from conftest import REPO, device_tol, tiny_config

needs_pydensecrf = pytest.mark.skipif(afa.losses.dcrf is None, reason="pydensecrf2 is absent")
PHOTOS = REPO / "tests" / "data" / "voc_photos" / "JPEGImages"


def _photo(name: str, height: int, width: int, top: int = 0, left: int = 0) -> np.ndarray:
    """An (h, w, 3) float32 crop of a repository photo, in 0-255."""
    image = np.asarray(Image.open(PHOTOS / f"{name}.jpg").convert("RGB"), dtype=np.float32)
    crop = image[top:top + height, left:left + width]
    assert crop.shape[:2] == (height, width)
    return np.ascontiguousarray(crop)


def _probs(k: int, h: int, w: int, seed: int) -> np.ndarray:
    """(K, h*w) float32 smooth softmax maps, as a segmentation head gives."""
    gen = torch.Generator().manual_seed(seed)
    logits = F.avg_pool2d(torch.randn(1, k, h, w, generator=gen), 5, 1, 2) * 4
    return logits.softmax(dim=1)[0].reshape(k, -1).numpy()


def _torch_filter(values: np.ndarray, image: np.ndarray, sigma_rgb: float, sigma_xy: float,
                  device=torch.device("cpu")) -> np.ndarray:
    h, w, _ = image.shape
    out = bilateral_filter_torch(torch.from_numpy(values).view(1, -1, h, w).to(device),
                                 torch.from_numpy(image).permute(2, 0, 1)[None].to(device),
                                 sigma_rgb, sigma_xy)
    return out[0].reshape(values.shape[0], -1).cpu().numpy()


# Portrait, landscape and odd sizes, one to 21 channels (one and two take the C++ code's
# sequential path, three and more its SSE one), the loss's widths (15, 100 x 0.5) and others.
PHOTO_CASES = [
    ("2007_000063", 37, 53, 1, 15.0, 50.0),
    ("2008_003238", 61, 29, 2, 15.0, 50.0),
    ("2009_003904", 45, 45, 3, 15.0, 50.0),
    ("2010_006026", 70, 33, 21, 15.0, 50.0),
    ("2011_001441", 96, 128, 21, 15.0, 50.0),
    ("2009_000488", 50, 75, 5, 5.0, 8.0),
]


@needs_pydensecrf
@pytest.mark.parametrize("name,h,w,k,sigma_rgb,sigma_xy", PHOTO_CASES)
def test_the_filter_equals_pydensecrf_bit_for_bit_on_photo_crops(name, h, w, k, sigma_rgb,
                                                                 sigma_xy):
    image = _photo(name, h, w, top=3, left=5)
    values = _probs(k, h, w, seed=k)
    expected = bilateral_filter(values, image, sigma_rgb, sigma_xy)
    actual = _torch_filter(values, image, sigma_rgb, sigma_xy)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


@needs_pydensecrf
@pytest.mark.parametrize("seed", range(3))
def test_the_filter_equals_pydensecrf_bit_for_bit_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    h, w, k = rng.integers(5, 40, size=2).tolist() + [int(rng.integers(1, 8))]
    image = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)  # noise: a lattice of many vertices
    values = rng.normal(0, 1, (k, h * w)).astype(np.float32)  # signed values, not probabilities
    expected = bilateral_filter(values, image, 15.0, 50.0)
    np.testing.assert_array_equal(_torch_filter(values, image, 15.0, 50.0), expected)


def test_a_batch_is_filtered_as_its_images_one_by_one():
    """Images of one batch share the lattice's tables but never a vertex."""
    names = ("2007_000063", "2009_003904", "2010_006026")
    images = torch.stack([torch.from_numpy(_photo(n, 24, 31)).permute(2, 0, 1) for n in names])
    values = torch.from_numpy(np.stack([_probs(4, 24, 31, seed=i) for i in range(3)]))
    values = values.view(3, 4, 24, 31)
    batch = bilateral_filter_torch(values, images, 15.0, 50.0)
    for i in range(3):
        alone = bilateral_filter_torch(values[i:i + 1], images[i:i + 1], 15.0, 50.0)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=0)
    # The same image twice in a batch gives the same values twice: nothing leaks across.
    twice = bilateral_filter_torch(values[:1].repeat(2, 1, 1, 1), images[:1].repeat(2, 1, 1, 1),
                                   15.0, 50.0)
    torch.testing.assert_close(twice[0], twice[1], rtol=0, atol=0)


def test_the_filter_approximates_the_dense_gaussian():
    """Not only equal to pydensecrf2: a Gaussian filter, with the lattice's near-constant weight."""
    image = _photo("2011_001441", 16, 20)
    values = _probs(3, 16, 20, seed=0)
    h, w, _ = image.shape
    feats = bilateral_features(torch.from_numpy(image).permute(2, 0, 1)[None], 15.0, 8.0)[0]
    feats = feats.double().numpy()
    exact = values.astype(np.float64) @ np.exp(
        -0.5 * ((feats[:, :, None] - feats[:, None, :]) ** 2).sum(0))
    lattice = _torch_filter(values, image, 15.0, 8.0)
    assert np.corrcoef(lattice.ravel(), exact.ravel())[0, 1] > 0.98
    assert 0.45 < lattice.sum() / exact.sum() < 0.65


def test_inputs_of_different_point_counts_and_keys_too_wide_are_refused():
    with pytest.raises(ValueError, match="differ in batch or point count"):
        lattice_filter(torch.zeros(1, 2, 10), torch.zeros(1, 5, 11))
    # Kernel widths far below the features' spacing need more lattice cells than 64 bits hold.
    features = torch.rand(1, 5, 400) * 1e5
    with pytest.raises(ValueError, match="do not fit in 64 bits"):
        lattice_filter(torch.rand(1, 2, 400), features)


def _loss_inputs(boxes, size=(46, 58), seed=0, all_ignore=False):
    """A batch of photo crops (odd sizes), softmax maps, pseudo labels and boxes."""
    h, w = size
    names = ("2008_003238", "2011_001722", "2010_002507")[: len(boxes)]
    rgb = torch.stack([torch.from_numpy(_photo(n, h, w)).permute(2, 0, 1) for n in names]) / 255
    gen = torch.Generator().manual_seed(seed)
    logits = F.avg_pool2d(torch.randn(len(boxes), 6, h, w, generator=gen), 5, 1, 2) * 4
    label = logits.argmax(dim=1)
    if all_ignore:
        label[:] = 255
    else:
        label[:, : h // 3] = 255
    return rgb, logits, label, torch.tensor(boxes)


def _loss_and_grad(crf, rgb, logits, label, boxes):
    logits = logits.clone().requires_grad_()
    loss = crf(rgb, logits.softmax(dim=1), label, boxes)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


@needs_pydensecrf
@pytest.mark.parametrize("case", ["different boxes", "all ignore", "one image"])
def test_the_loss_and_its_gradient_equal_the_pydensecrf_backend(case, device):
    boxes = {"different boxes": [[0, 46, 0, 58], [4, 40, 0, 50], [0, 30, 9, 58]],
             "all ignore": [[0, 46, 0, 58], [0, 46, 3, 41]],
             "one image": [[2, 45, 1, 57]]}[case]
    rgb, logits, label, boxes = _loss_inputs(boxes, all_ignore=case == "all ignore")
    reference = DenseCRFLoss(backend="pydensecrf")
    on_device = DenseCRFLoss(backend="torch")
    loss, grad = _loss_and_grad(reference, rgb, logits, label, boxes)
    loss_t, grad_t = _loss_and_grad(on_device, *(x.to(device) for x in (rgb, logits, label,
                                                                         boxes)))
    assert loss < 0 and torch.isfinite(grad).all()
    assert loss_t.device.type == device.type
    if device.type == "cpu":  # the same float32 operations in the same order
        assert torch.equal(loss_t, loss) and torch.equal(grad_t, grad)
    else:
        torch.testing.assert_close(loss_t.cpu(), loss, **device_tol(device, 1e-6, 0))
        torch.testing.assert_close(grad_t.cpu(), grad, **device_tol(device, 1e-6, 1e-12))
    far_outside = ~F.max_pool2d(box_mask(boxes, *rgb.shape[-2:])[:, None].float(), 5, 1, 2).bool()
    assert (grad_t.cpu()[far_outside.expand_as(grad)] == 0).all()  # bilinear: 2 px around a box


def test_the_torch_backend_needs_no_pydensecrf(monkeypatch):
    monkeypatch.setattr(afa.losses, "dcrf", None)
    with pytest.raises(ImportError, match="loss.reg_backend=torch"):
        DenseCRFLoss(backend="pydensecrf")
    rgb, logits, label, boxes = _loss_inputs([[0, 46, 0, 58]])
    loss = DenseCRFLoss(backend="torch")(rgb, logits.softmax(1), label, boxes)
    assert torch.isfinite(loss) and loss < 0
    assert reg_backend("auto", torch.device("cpu"))[0] == "torch"  # auto falls back to it
    with pytest.raises(ValueError, match="backend must be one of"):
        DenseCRFLoss(backend="cuda")


@needs_pydensecrf
def test_auto_is_torch_on_cuda_and_pydensecrf_on_the_cpu():
    assert reg_backend("auto", torch.device("cuda"))[0] == "torch"
    assert reg_backend("auto", torch.device("cpu"))[0] == "pydensecrf"
    assert reg_backend("torch", torch.device("cpu")) == ("torch", "loss.reg_backend=torch")
    rgb, logits, _, boxes = _loss_inputs([[0, 46, 0, 58], [4, 40, 0, 50]])
    times = time_filter(DenseCRFLoss(backend="torch"), rgb, logits.softmax(1), boxes, repeats=2)
    assert len(times) == 2 and all(t > 0 for t in times)


def test_a_wrong_backend_is_one_config_error(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="loss.reg_backend"):
        tiny_config(tiny_data, tmp_path, **{"loss.reg_backend": "gpu"})


@needs_pydensecrf
@pytest.mark.slow
def test_training_with_either_backend_gives_the_same_weights(tiny_data, tmp_path):
    """Four iterations with the regularized loss on (from the second): the torch backend's run
    equals the reference's, loss for loss and weight for weight, and train.log says which
    backend ran and what its filter cost."""
    runs = {}
    for backend in ("pydensecrf", "torch"):
        work = tmp_path / backend
        cfg = tiny_config(tiny_data, work, device="cpu", **{"loss.reg_loss": True,
                                                            "loss.reg_backend": backend,
                                                            "train.eval_iters": 100})
        train(cfg)
        log = (work / "train.log").read_text()
        assert f"Regularized loss: bilateral filter by {backend} " in log
        assert f"(loss.reg_backend={backend}); 2 x 9 x 32 x 32 takes " in log  # 8 shapes
        records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().split("\n")
                   if line]
        state = torch.load(work / "checkpoints" / "iter_000004.pth", weights_only=True)
        runs[backend] = ([r.get("train/reg_loss") for r in records], state["model"])
    (losses_ref, weights_ref), (losses_t, weights_t) = runs["pydensecrf"], runs["torch"]
    assert any(v for v in losses_ref if v) and losses_t == losses_ref
    for name, tensor in weights_ref.items():
        assert torch.equal(weights_t[name], tensor), name


@needs_pydensecrf
def test_the_loss_on_training_crops_of_each_photo_set_is_the_same_with_either_backend(voc_set):
    """The loss's real inputs: 320-pixel crops (padded where a photo is smaller, as the training
    crop is) of the first photos of each set, 21 classes, at the loss's half resolution."""
    paths = sorted((voc_set / "JPEGImages").glob("*.jpg"))[:4]
    crops, boxes = [], []
    for path in paths:
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32))
        image = image.permute(2, 0, 1)[:, :320, :320] / 255
        h, w = image.shape[1:]
        crops.append(F.pad(image, (0, 320 - w, 0, 320 - h)))
        boxes.append([0, h, 0, w])
    rgb, boxes = torch.stack(crops), torch.tensor(boxes)
    gen = torch.Generator().manual_seed(1)
    logits = F.interpolate(torch.randn(len(paths), 21, 20, 20, generator=gen) * 3, size=(320, 320),
                           mode="bilinear")
    label = logits.argmax(dim=1)
    label[:, ::7] = 255
    loss, grad = _loss_and_grad(DenseCRFLoss(backend="pydensecrf"), rgb, logits, label, boxes)
    loss_t, grad_t = _loss_and_grad(DenseCRFLoss(backend="torch"), rgb, logits, label, boxes)
    assert torch.equal(loss_t, loss) and torch.equal(grad_t, grad)
