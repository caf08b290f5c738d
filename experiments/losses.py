"""The training losses of the experiment programs: one meaning per ``--loss`` name.

* ``xent``: cross-entropy of the logits ``f`` (``F.cross_entropy``).
* ``mse``: the mean over the C classes of ``(f_c - t_c)²`` with centred one-hot targets
  ``t = onehot(y) - 1/C`` (the targets of the original π-limit programs; their mean over
  classes is 0, like a zero-initialized readout's outputs).

Both are per-example losses; :func:`loss_sum` sums them over the batch, :func:`loss_mean`
averages them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "LOSS_HELP", "per_example_loss", "loss_sum", "loss_mean"]

LOSSES = ("xent", "mse")
LOSS_HELP = (
    "xent: cross-entropy; mse: mean over the C classes of (f_c - t_c)² with centred "
    "one-hot targets t = onehot(y) - 1/C; both averaged over the examples of a step"
)


def per_example_loss(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss ``name`` of every example (a vector), computed in float32 or wider."""
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    if name == "xent":
        return F.cross_entropy(out, y, reduction="none")
    if name == "mse":
        classes = out.shape[1]
        target = F.one_hot(y, classes).to(out.dtype) - 1.0 / classes
        return (out - target).pow(2).mean(dim=1)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


def loss_sum(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of the per-example loss."""
    if name == "xent":  # one fused call (the same numbers as the per-example sum)
        wide = out if out.dtype in (torch.float32, torch.float64) else out.float()
        return F.cross_entropy(wide, y, reduction="sum")
    return per_example_loss(name, out, y).sum()


def loss_mean(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the per-example loss."""
    return loss_sum(name, out, y) / max(int(y.shape[0]), 1)
