"""Batched N-way K-shot task sampling over an :class:`~experiments.data.omniglot.OmniglotSplit`.

A task draws ``num_ways`` distinct classes of the split (a class is a
character at one rotation) and, for each, ``num_shots + num_shots_test``
distinct drawings: the first ``num_shots`` are the support set, the rest the
query set, so support and query never share a drawing.  The task's labels
``0 .. num_ways-1`` are assigned to the chosen classes in random order.
Examples are laid out class by class: support targets of every task are
``[0]*K + [1]*K + ... + [N-1]*K`` and query targets likewise with ``Q``.

Randomness: batch ``i`` is drawn from ``numpy.random.default_rng([seed, i])``
alone, so it is the same whatever batches were drawn before or after it and
whichever order they are requested in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from experiments.data.omniglot import DEFAULT_SPLIT_SIZES, OmniglotSplit, load_omniglot

__all__ = ["TaskBatch", "TaskIndices", "TaskSampler", "omniglot_task_sampler"]


class TaskBatch(NamedTuple):
    """One batch of tasks (unpacks as a 4-tuple)."""

    support_inputs: torch.Tensor  # (B, N*K, 1, S, S), or (B, N*K, S*S) when flattened
    support_targets: torch.Tensor  # (B, N*K) int64 in [0, N)
    query_inputs: torch.Tensor  # (B, N*Q, 1, S, S), or (B, N*Q, S*S)
    query_targets: torch.Tensor  # (B, N*Q) int64 in [0, N)


class TaskIndices(NamedTuple):
    """What a batch is made of, before images are gathered."""

    classes: np.ndarray  # (B, N) split class of label n in task b
    drawings: np.ndarray  # (B, N, K+Q) drawing numbers; [..., :K] support, [..., K:] query


class TaskSampler:
    """Iterable of ``num_batches`` :class:`TaskBatch` es of ``batch_size`` tasks.

    Args:
        split: the classes to draw from.
        num_ways: classes per task (N).
        num_shots: support drawings per class (K).
        num_shots_test: query drawings per class (Q).
        batch_size: tasks per batch (B).
        num_batches: batches yielded by iteration; ``None`` iterates forever.
        seed: non-negative integer; with the batch index it fixes each batch.
        flatten: return inputs as vectors of ``S*S`` (784) features, for MLPs.
        dtype, device: of the input tensors (targets are int64 on ``device``).
    """

    def __init__(
        self,
        split: OmniglotSplit,
        num_ways: int = 5,
        num_shots: int = 1,
        num_shots_test: int = 15,
        batch_size: int = 16,
        num_batches: int | None = 100,
        seed: int = 0,
        flatten: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        if num_ways < 1 or num_shots < 1 or num_shots_test < 0 or batch_size < 1:
            raise ValueError("need num_ways >= 1, num_shots >= 1, num_shots_test >= 0, batch_size >= 1")
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches must be >= 0 or None, got {num_batches}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if num_ways > split.num_classes:
            raise ValueError(
                f"{num_ways}-way tasks need at least {num_ways} classes but the "
                f"{split.name!r} split has only {split.num_classes}"
            )
        fewest = int(split.class_counts.min())
        if num_shots + num_shots_test > fewest:
            raise ValueError(
                f"{num_shots} support + {num_shots_test} query drawings per class need "
                f"{num_shots + num_shots_test} distinct drawings, but some character of the "
                f"{split.name!r} split has only {fewest}"
            )
        self.split = split
        self.num_ways = num_ways
        self.num_shots = num_shots
        self.num_shots_test = num_shots_test
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = int(seed)
        self.flatten = flatten
        self.dtype = dtype
        self.device = device

    def rng(self, batch_index: int) -> np.random.Generator:
        """The generator that batch ``batch_index`` is drawn from."""
        if batch_index < 0:
            raise ValueError(f"batch_index must be non-negative, got {batch_index}")
        return np.random.default_rng([self.seed, int(batch_index)])

    def sample_indices(self, batch_index: int) -> TaskIndices:
        """Classes and drawings of batch ``batch_index`` (deterministic)."""
        rng = self.rng(batch_index)
        B, N, M = self.batch_size, self.num_ways, self.num_shots + self.num_shots_test
        n_classes = self.split.num_classes
        classes = np.stack([rng.choice(n_classes, size=N, replace=False) for _ in range(B)])
        counts = self.split.class_counts[classes]  # (B, N)
        keys = rng.random((B, N, int(counts.max())))
        keys[np.arange(keys.shape[-1]) >= counts[..., None]] = np.inf  # padding never chosen
        drawings = np.argsort(keys, axis=-1)[..., :M]
        return TaskIndices(classes.astype(np.int64), drawings.astype(np.int64))

    def sample_batch(self, batch_index: int) -> TaskBatch:
        """Batch number ``batch_index`` (the same for the same seed and index)."""
        idx = self.sample_indices(batch_index)
        B, N, K, Q = self.batch_size, self.num_ways, self.num_shots, self.num_shots_test
        raw = self.split.gather(idx.classes, idx.drawings)  # uint8 (B, N, K+Q, S, S)
        S = raw.shape[-1]
        feat = (S * S,) if self.flatten else (1, S, S)
        to_float = self.split.data.to_float  # split support/query while still uint8
        support = to_float(raw[:, :, :K].reshape(B, N * K, S, S)).reshape(B, N * K, *feat)
        query = to_float(raw[:, :, K:].reshape(B, N * Q, S, S)).reshape(B, N * Q, *feat)
        if self.dtype != torch.float32:
            support, query = support.to(self.dtype), query.to(self.dtype)
        labels = torch.arange(N, dtype=torch.int64)
        support_y = labels.repeat_interleave(K).expand(B, N * K).contiguous()
        query_y = labels.repeat_interleave(Q).expand(B, N * Q).contiguous()
        if self.device is not None:
            support, query = support.to(self.device), query.to(self.device)
            support_y, query_y = support_y.to(self.device), query_y.to(self.device)
        return TaskBatch(support, support_y, query, query_y)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless TaskSampler (num_batches=None) has no length")
        return self.num_batches

    def __iter__(self) -> Iterator[TaskBatch]:
        i = 0
        while self.num_batches is None or i < self.num_batches:
            yield self.sample_batch(i)
            i += 1


def omniglot_task_sampler(
    root,
    split: str = "train",
    num_ways: int = 5,
    num_shots: int = 1,
    num_shots_test: int = 15,
    batch_size: int = 16,
    num_batches: int | None = 100,
    seed: int = 0,
    flatten: bool = False,
    split_sizes=DEFAULT_SPLIT_SIZES,
    rotations=(0, 1, 2, 3),
    dtype: torch.dtype = torch.float32,
    device=None,
    **load_kwargs,
) -> TaskSampler:
    """Load Omniglot from ``root`` and build a :class:`TaskSampler` on one split.

    ``load_kwargs`` (``image_size``, ``resample``, ``invert``, ``cache_file``,
    ...) go to :func:`~experiments.data.omniglot.load_omniglot`.
    """
    data = load_omniglot(root, **load_kwargs)
    return TaskSampler(
        OmniglotSplit(data, split, split_sizes, rotations),
        num_ways=num_ways,
        num_shots=num_shots,
        num_shots_test=num_shots_test,
        batch_size=batch_size,
        num_batches=num_batches,
        seed=seed,
        flatten=flatten,
        dtype=dtype,
        device=device,
    )
