"""Parameter groups by role: lr multipliers of the first layer, the readout and the biases.

Roles come from the network (``net.param_roles()``), never from layer positions.
"""

from __future__ import annotations

from torch import nn

__all__ = ["pi_param_groups"]


_MULT_OF_ROLE = {
    "first": lambda f, l, b: f,
    "last": lambda f, l, b: l,
    "hidden": lambda f, l, b: 1.0,
    "bias": lambda f, l, b: b,
    "first_bias": lambda f, l, b: b * f,
    "last_bias": lambda f, l, b: b * l,
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


def pi_param_groups(
    net: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    first_layer_lr_mult: float = 1.0,
    last_layer_lr_mult: float = 1.0,
    bias_lr_mult: float = 1.0,
    apply_lr_mult_to_wd: bool = True,
    layers: list[nn.Module] | None = None,
) -> list[dict]:
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
        raise ValueError(
            "pi_param_groups needs a net with param_roles() (InfMLP, FinPiMLPSample, MuMLP) "
            "or layers=[input, hidden…, output]"
        )
    groups: dict[str, dict] = {}
    seen = set()
    for p in net.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        role = roles.get(id(p), "other")
        mult = (
            1.0
            if role == "other"
            else _MULT_OF_ROLE[role](first_layer_lr_mult, last_layer_lr_mult, bias_lr_mult)
        )
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
