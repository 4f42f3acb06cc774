"""Data order: LLaVA's group-by-modality-length, made independent of the number of GPUs.

LLaVA shuffles image and text-only samples separately, cuts them into
megabatches sorted by length (less padding), and shuffles the megabatches, so a
micro-batch never mixes modalities. Here a megabatch is one *global* batch, so
the order, and therefore every optimizer step, is the same on 1 GPU or 64: the
loss curve does not depend on the launch. The order is a function of
(seed, epoch) only, which is what ``--resume`` relies on.
"""

from __future__ import annotations

import numpy as np


def epoch_order(lengths: list[int], global_batch: int, seed: int, epoch: int, group_by_modality: bool) -> list[int]:
    rng = np.random.default_rng([seed, epoch])
    if not group_by_modality:
        return [int(i) for i in rng.permutation(len(lengths))]
    mm = [i for i, n in enumerate(lengths) if n > 0]
    lang = [i for i, n in enumerate(lengths) if n <= 0]
    megabatches, leftovers = [], []
    for group in (mm, lang):
        group = [group[i] for i in rng.permutation(len(group))]
        full = len(group) // global_batch * global_batch
        for s in range(0, full, global_batch):
            mb = sorted(group[s : s + global_batch], key=lambda i: -abs(lengths[i]))
            megabatches.append(mb)
        leftovers += group[full:]
    order = [i for k in rng.permutation(len(megabatches)) for i in megabatches[k]]
    return order + leftovers


class EpochSampler:
    """A torch-compatible sampler over :func:`epoch_order`; ``set_epoch`` picks the epoch."""

    def __init__(self, lengths: list[int], global_batch: int, seed: int, group_by_modality: bool = True):
        self.lengths, self.global_batch, self.seed = lengths, global_batch, seed
        self.group_by_modality = group_by_modality
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_order(self.lengths, self.global_batch, self.seed, self.epoch, self.group_by_modality))

    def __len__(self) -> int:
        return len(self.lengths)
