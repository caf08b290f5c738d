"""Initialization of π-layers (``net.apply(pi_init)``, the π-net analogue of kaiming init)."""

from __future__ import annotations

from torch import nn

from .layers import FinPiInputLinearReLU, FinPiLinearReLU, InfPiInputLinearReLU, InfPiLinearReLU

__all__ = ["pi_init", "PI_LAYERS"]

PI_LAYERS = (InfPiInputLinearReLU, InfPiLinearReLU, FinPiInputLinearReLU, FinPiLinearReLU)


def pi_init(module: nn.Module):
    """Re-initialize a π-layer (use as ``net.apply(pi_init)``); other modules are left alone.

    Infinite layers get their initial ``r`` rows; finite layers are re-sampled
    from a fresh infinite layer with their own Ω (so a finite net stays a π-net
    only if every layer is re-sampled consistently: prefer ``FinPiMLPSample``).
    """
    if isinstance(module, PI_LAYERS):
        module.reset_parameters()
