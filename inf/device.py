"""Device selection with an error that says how to fix a missing GPU."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device) -> torch.device:
    """``torch.device(device)``, with a clear error when CUDA is asked for without a GPU."""
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {str(device)!r} was requested but no CUDA GPU is available "
            "(torch.cuda.is_available() is False): use device='cpu' (drop --cuda), or "
            "install a CUDA build of torch on a machine with a GPU"
        )
    return dev
