"""Initialization, gradient clipping and parameter groups for π-nets.

Drop-in table::

    torch.optim.SGD                      -> inf.optim.InfSGD
    torch.nn.utils.clip_grad_norm_       -> inf.utils.store_pi_grad_norm_ + inf.utils.clip_grad_norm_
    kaiming init (net.apply(...))        -> net.apply(inf.utils.pi_init)

Gradient norms of π-parameters (spec §5): an infinite layer's gradient is its
pending rows, whose Frobenius norm is ``sqrt(Σ_ij (A_i·A_j) F00(B_i·B_j))``;
a finite π-weight's gradient counts after projection onto ``span(Ω)``, so both
widths clip the same amount.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .layers import FinPiInputLinearReLU, FinPiLinearReLU, InfPiInputLinearReLU, InfPiLinearReLU, _FinPiLayer
from .tensors import FinPiParameter, InfPiParameter, RowStore, owner_of

__all__ = ["pi_init", "store_pi_grad_norm_", "clip_grad_norm_", "pi_grad_norms", "project_pi_grads_",
           "pi_param_groups", "resolve_device", "PI_LAYERS"]

PI_LAYERS = (InfPiInputLinearReLU, InfPiLinearReLU, FinPiInputLinearReLU, FinPiLinearReLU)


def pi_init(module: nn.Module):
    """Re-initialize a π-layer (use as ``net.apply(pi_init)``); other modules are left alone.

    Infinite layers get their initial ``r`` rows; finite layers are re-sampled
    from a fresh infinite layer with their own Ω (so a finite net stays a π-net
    only if every layer is re-sampled consistently: prefer ``FinPiMLPSample``).
    """
    if isinstance(module, PI_LAYERS):
        module.reset_parameters()


def _params(parameters) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    if isinstance(parameters, nn.Module):
        return list(parameters.parameters())
    return list(parameters)


def pi_grad_norms(parameters) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(param, gradient norm)`` for every parameter with a gradient, π-aware.

    ``A``/``B`` of infinite layers are skipped: their gradient is counted once,
    through the coefficients ``Amult``.
    """
    out = []
    for p in _params(parameters):
        if isinstance(p, InfPiParameter):
            store = owner_of(p)
            if store is None or p is not store.Amult or p.grad is None or store.num_pending == 0:
                continue
            out.append((p, store.pending_grad_norm()))
        elif p.grad is not None:
            owner = owner_of(p) if isinstance(p, FinPiParameter) else None
            if owner is not None and owner.projected:
                out.append((p, owner.projected_norm(p.grad)))
            else:
                out.append((p, torch.linalg.vector_norm(p.grad.detach().float())))
    return out


def store_pi_grad_norm_(modules: Iterable[nn.Module] | nn.Module) -> dict[str, float]:
    """Compute and store the gradient norm of every π-layer's weight (``layer.pi_grad_norm``).

    Kept for the original library's two-call idiom; :func:`clip_grad_norm_`
    computes the same norms itself, so calling this first is optional.
    Returns ``{layer name: norm}``.
    """
    if isinstance(modules, nn.Module):
        modules = modules.modules()
    norms = {}
    for m in modules:
        if isinstance(m, InfPiLinearReLU):
            weight, name = m.Amult, m.name
        elif isinstance(m, _FinPiLayer):
            weight, name = m.weight, repr(m)
        else:
            continue
        found = pi_grad_norms([weight])
        m.pi_grad_norm = float(found[0][1]) if found else 0.0
        norms[name] = m.pi_grad_norm
    return norms


def _scale_grad_(p: torch.Tensor, coef: torch.Tensor):
    if isinstance(p, InfPiParameter):
        owner_of(p).scale_pending_(float(coef))
    else:
        p.grad.mul_(coef.to(p.grad.dtype))


def clip_grad_norm_(parameters, max_norm: float, per_param: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Clip gradients, π-parameters included (spec §5).

    Global clipping (default) scales every gradient by ``min(1, max_norm / total)``;
    ``per_param=True`` clips each parameter (an infinite layer's weight, a bias, a
    finite weight) to ``max_norm`` separately. ``max_norm <= 0`` disables clipping.
    Returns the total norm before clipping.
    """
    norms = pi_grad_norms(parameters)
    if not norms:
        return torch.zeros(())
    total = torch.sqrt(sum(n.double() ** 2 for _, n in norms))
    if max_norm is None or max_norm <= 0:
        return total
    if not torch.isfinite(total):
        raise FloatingPointError(f"gradient norm is {float(total)}; refusing to clip a non-finite gradient")
    if per_param:
        for p, n in norms:
            coef = torch.clamp(max_norm / (n.double() + eps), max=1.0)
            _scale_grad_(p, coef)
    else:
        coef = torch.clamp(max_norm / (total + eps), max=1.0)
        for p, _ in norms:
            _scale_grad_(p, coef)
    return total


def project_pi_grads_(parameters):
    """Project the gradients of finite π-weights onto span(Ω), in place (InfSGD does this
    itself; use this for hand-written update rules such as MAML inner loops)."""
    for p in _params(parameters):
        if isinstance(p, FinPiParameter) and p.grad is not None:
            owner_of(p).project_(p.grad)


_MULT_OF_ROLE = {
    "first": lambda f, l, b: f, "last": lambda f, l, b: l, "hidden": lambda f, l, b: 1.0,
    "bias": lambda f, l, b: b, "first_bias": lambda f, l, b: b * f, "last_bias": lambda f, l, b: b * l,
}


def _roles_from_layers(layers: list[nn.Module]) -> dict[int, str]:
    """Roles by position for a plain list of layers (input, hidden…, output)."""
    roles = {}
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        kind = "first" if i == 0 else "last" if i == last else "hidden"
        for name, p in layer.named_parameters():
            is_bias = name.split(".")[-1] == "bias"
            roles.setdefault(id(p), ("bias" if kind == "hidden" else f"{kind}_bias") if is_bias else kind)
    return roles


def pi_param_groups(net: nn.Module, lr: float, weight_decay: float = 0.0, first_layer_lr_mult: float = 1.0,
                    last_layer_lr_mult: float = 1.0, bias_lr_mult: float = 1.0,
                    apply_lr_mult_to_wd: bool = True, layers: list[nn.Module] | None = None) -> list[dict]:
    """Param groups by role, from ``net.param_roles()`` (or from ``layers=[input, hidden…, output]``).

    lr multipliers: first layer ``first_layer_lr_mult``, output layer
    ``last_layer_lr_mult``, biases ``bias_lr_mult`` (times the layer's own
    multiplier). With ``apply_lr_mult_to_wd=False`` each group's weight decay is
    divided by its lr multiplier, so the decay per step ``lr·wd`` stays the base
    ``lr·wd`` whatever the multiplier (the original ``--no-apply-lr-mult-to-wd``).
    Each group carries its ``role`` and ``lr_mult``; parameters without a role
    go to a group ``other`` with multiplier 1.
    """
    if layers is not None:
        roles = _roles_from_layers(list(layers))
    elif hasattr(net, "param_roles"):
        named = dict(net.named_parameters())
        roles = {id(named[name]): role for name, role in net.param_roles().items() if name in named}
    else:
        raise ValueError("pi_param_groups needs a net with param_roles() (InfMLP, FinPiMLPSample, MuMLP) "
                         "or layers=[input, hidden…, output]")
    groups: dict[str, dict] = {}
    seen = set()
    for p in net.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        role = roles.get(id(p), "other")
        mult = 1.0 if role == "other" else _MULT_OF_ROLE[role](first_layer_lr_mult, last_layer_lr_mult,
                                                                bias_lr_mult)
        groups.setdefault(role, {"params": [], "role": role, "lr_mult": mult})["params"].append(p)
    out = []
    for g in groups.values():
        mult = g["lr_mult"]
        g["lr"] = lr * mult
        if apply_lr_mult_to_wd or mult == 0:
            g["weight_decay"] = weight_decay
        else:
            g["weight_decay"] = weight_decay / mult
        out.append(g)
    return out


def resolve_device(device) -> torch.device:
    """``torch.device(device)``, with a clear error when CUDA is asked for without a GPU."""
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was requested but no CUDA GPU is available "
                           "(torch.cuda.is_available() is False): use device='cpu', or install a CUDA "
                           "build of torch on a machine with a GPU")
    return dev
