"""Dense CRF post-processing (Kraehenbuehl & Koltun 2011) through ``pydensecrf2``.

AFA refines its test-time segmentation with a fully connected CRF: the unary term is the negative
log of the network's class probabilities, the pairwise terms are a Gaussian (smoothness) kernel and
a bilateral (appearance) kernel, mean-field inference for 10 iterations. The defaults below are the
authors' (``utils/dcrf.py`` ``DenseCRF`` as set up in ``scripts/test_msc_flip.py`` of their
release): Gaussian ``sxy=3, compat=3``; bilateral ``sxy=64, srgb=5, compat=4``, both with
pydensecrf's default kernel (``DIAG_KERNEL``) and normalisation (``NORMALIZE_SYMMETRIC``); the
unary is ``pydensecrf.utils.unary_from_softmax``: the negative log of the probabilities clipped to
``[1e-5, 1]``, in float32.

``pydensecrf2`` is imported only when a CRF is actually run, so the rest of the package works
without it.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from types import ModuleType

import numpy as np

from afa.engine.distributed import usable_cpus
from afa.worker_pool import die_with_parent

__all__ = ["CRF_SETTINGS", "import_densecrf", "dense_crf", "dense_crf_many"]

# Probabilities are clipped to this before the log, so that a zero probability gives a large but
# finite unary energy (-log(1e-5) ~ 11.5). The value is the authors' (``unary_from_softmax``'s
# default clip, which their DenseCRF uses); a lower floor lets confident pixels resist the pairwise
# terms more and changes the CRF's output.
PROB_FLOOR = 1e-5


def import_densecrf() -> ModuleType:
    """Return ``pydensecrf.densecrf``, or raise ``ImportError`` saying how to install it."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as err:
        raise ImportError(
            "the dense CRF needs the 'pydensecrf2' package (imported as 'pydensecrf'); install it "
            "with `pip install pydensecrf2` (it ships binary wheels for Linux), or run without CRF"
        ) from err
    return dcrf


# The dense CRF of the authors' inference (docs/method.md, 'Inference'): what infer_seg --crf
# runs and records in its run.json.
CRF_SETTINGS = dict(iterations=10, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=64.0,
                    bilateral_srgb=5.0, bilateral_compat=4.0)


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    *,
    iterations: int = 10,
    gaussian_sxy: float = 3,
    gaussian_compat: float = 3,
    bilateral_sxy: float = 64,
    bilateral_srgb: float = 5,
    bilateral_compat: float = 4,
) -> np.ndarray:
    """Refine class probabilities with a dense CRF.

    Args:
        image: ``(H, W, 3)`` RGB image, uint8 (any memory layout; read-only arrays are fine).
        probs: ``(K, H, W)`` class probabilities (each pixel sums to 1), any float dtype.
        iterations: mean-field iterations.
        gaussian_sxy, gaussian_compat: spatial std (pixels) and Potts weight of the smoothness term.
        bilateral_sxy, bilateral_srgb, bilateral_compat: spatial std (pixels), colour std (0-255)
            and Potts weight of the appearance term.

    Returns:
        ``(K, H, W)`` float32 probabilities: non-negative, summing to 1 over ``K`` at each pixel.
    """
    dcrf = import_densecrf()
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"probs must be (K, H, W) matching the image's (H, W) = {image.shape[:2]}, "
            f"got shape {probs.shape}"
        )
    num_classes, height, width = probs.shape
    # pydensecrf rejects read-only or non-C-contiguous buffers (e.g. arrays straight from PIL).
    rgb = np.require(image, dtype=np.uint8, requirements=["C", "W"])
    unary = -np.log(np.clip(probs, PROB_FLOOR, 1.0)).reshape(num_classes, -1)
    unary = np.ascontiguousarray(unary, dtype=np.float32)

    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=rgb, compat=bilateral_compat
    )
    q = np.asarray(crf.inference(iterations), dtype=np.float32)  # (K, H*W), softmax-normalised
    return q.reshape(num_classes, height, width)


def _dense_crf_pair(pair: tuple[np.ndarray, np.ndarray], **crf_kwargs) -> np.ndarray:
    image, probs = pair
    return dense_crf(image, probs, **crf_kwargs)


def dense_crf_many(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    workers: int | None = None,
    max_pending: int | None = None,
    mp_context: str = "spawn",
    **crf_kwargs,
) -> Iterator[np.ndarray]:
    """Run :func:`dense_crf` over ``(image, probs)`` pairs in a process pool, yielding in order.

    Each result is yielded, in input order, as soon as it is ready; at most ``max_pending``
    pairs (default ``2 * workers``) are in flight, so memory stays bounded for a lazy input such
    as a generator over a data loader. ``workers`` defaults to the CPUs this process may use;
    ``workers=0`` runs in this process. ``crf_kwargs`` go to :func:`dense_crf`. The default
    ``spawn`` start method is safe in processes that already use CUDA or threads; like any spawn
    pool it needs the calling script's ``if __name__ == "__main__":`` guard.
    """
    import_densecrf()  # a missing package fails before any worker starts
    run_one = partial(_dense_crf_pair, **crf_kwargs)
    if workers is None:
        workers = usable_cpus()
    if workers == 0:
        yield from map(run_one, pairs)
        return
    max_pending = max_pending or 2 * workers
    pending: deque[Future] = deque()
    context = multiprocessing.get_context(mp_context)
    # The workers end with this process, however it ends: a killed tool leaves no CRF processes.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                               initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        for pair in pairs:
            if len(pending) >= max_pending:
                yield pending.popleft().result()
            pending.append(pool.submit(run_one, pair))
        while pending:
            yield pending.popleft().result()
    finally:
        # Also reached when the consumer stops early: drop the queued work instead of running it.
        pool.shutdown(wait=True, cancel_futures=True)
