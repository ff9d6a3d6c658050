"""A data order, and per-batch randomness, that depend only on the seed and the stream position.

Training reads one endless *stream* of samples: epoch ``e`` is a permutation seeded by
``seed + e``, cut to a multiple of the global batch. The stream is cut into *chunks* of
``batch_size`` consecutive samples, and chunk ``k`` goes to rank ``k % world_size``. A rank's
``j``-th micro-batch is therefore chunk ``j * world_size + rank``, and one optimiser step always
covers the same ``global_batch`` samples in the same chunks, whether they come from 2 processes
or from 1 process accumulating 2 micro-batches.

Each sample's augmentation seed is derived from its stream position, and the trainer seeds torch
(dropout, stochastic depth) from the chunk index: randomness never depends on the number of
processes or loader workers. Resuming needs one number, the micro-batches a rank has consumed,
and continues exactly where the interrupted run was.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["ResumableSampler", "SeededDataset", "stream_seed"]


def stream_seed(seed: int, position: int, salt: int = 0) -> int:
    """A well-mixed 63-bit seed for ``(seed, position, salt)``."""
    return int(np.random.SeedSequence([seed, position, salt]).generate_state(2, np.uint32)
               .astype(np.uint64).view(np.uint64)[0] >> np.uint64(1))


class ResumableSampler(Sampler):
    """Yields ``(dataset_index, sample_seed)`` for this rank's chunks, forever.

    Args:
        size: number of training images.
        batch_size: samples per chunk (the per-process micro-batch).
        global_batch: samples per optimiser step over all processes; epochs are cut to a multiple.
        seed: the run's seed.
        rank, world_size: this process and the number of processes.
        start_batches: micro-batches this rank has already consumed (resume).
    """

    def __init__(self, size: int, batch_size: int, global_batch: int, seed: int, rank: int = 0,
                 world_size: int = 1, start_batches: int = 0):
        if global_batch % (batch_size * world_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of {batch_size} x "
                             f"{world_size} processes")
        self.per_epoch = (size // global_batch) * global_batch
        if self.per_epoch == 0:
            raise ValueError(f"{size} training images cannot fill one global batch of "
                             f"{global_batch}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_batches = start_batches
        self._epoch, self._order = -1, None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=g).tolist()
        return self._order[offset]

    def __iter__(self):
        j = self.start_batches
        while True:
            chunk = j * self.world_size + self.rank
            for position in range(chunk * self.batch_size, (chunk + 1) * self.batch_size):
                yield self._index(position), stream_seed(self.seed, position)
            j += 1

    def __len__(self) -> int:  # samples of one epoch for this rank; the iterator never ends
        return self.per_epoch // self.world_size


class SeededDataset(Dataset):
    """Loads ``(index, seed)`` keys through ``dataset.load(index, rng)`` with that sample's own rng."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        return self.dataset.load(index, np.random.default_rng(seed))
