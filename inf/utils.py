"""The helpers of pilimit 0.1 in one namespace; each now lives in a module of its own job.

inf.init    pi_init, PI_LAYERS                   (``net.apply(pi_init)``)
inf.clip    clip_grad_norm_, pi_grad_norms       (π-aware gradient clipping)
inf.groups  pi_param_groups                      (param groups by role)
inf.device  resolve_device                       (CUDA without a GPU says how to fix it)
inf.layers  project_gradient_                    (the one projection onto span(Ω))
inf.compat  store_pi_grad_norm_                  (the original library's two-call idiom)
"""

from .clip import clip_grad_norm_, pi_grad_norms
from .compat import store_pi_grad_norm_
from .device import resolve_device
from .groups import pi_param_groups
from .init import PI_LAYERS, pi_init
from .layers import project_gradient_

__all__ = [
    "pi_init",
    "PI_LAYERS",
    "clip_grad_norm_",
    "pi_grad_norms",
    "pi_param_groups",
    "resolve_device",
    "store_pi_grad_norm_",
    "project_pi_grads_",
    "project_gradient_",
]


def project_pi_grads_(parameters):
    """Project the accumulated gradients of finite π-weights onto span(Ω), in place. Backward
    does this already; kept for hand-written update rules of pilimit 0.1."""
    for p in parameters.parameters() if hasattr(parameters, "parameters") else parameters:
        project_gradient_(p)
