"""Names of the original π-limit library (santacml/pilim) and of pilimit 0.1, as aliases.

Primary names say what things are (``coefficients``, ``InfSGD``, ``F00``); the old
ones keep working from here, so code ported from the original library runs
unchanged. Importing :mod:`inf` installs the attribute aliases.

=============================  ======================================================
old name                       what it is now
=============================  ======================================================
``layer.Amult``, ``rows.Amult``  ``layer.coefficients`` / ``rows.coefficients``
``PiSGD``                        :class:`inf.optim.InfSGD`
``F00ReLUsqrt`` …, ``J1``        :func:`inf.math.F00` (times the standard deviations) …
``store_pi_grad_norm_``          not needed: :func:`inf.clip.clip_grad_norm_` computes norms
``owner_of``                     :func:`inf.parameters.owner_of`
state-dict key ``…rows.Amult``   ``…rows.coefficients`` (old checkpoints load)
=============================  ======================================================
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .clip import pi_grad_norms
from .layers import InfPiLinearReLU, _FinPiLayer
from .math import F00, F02, F11
from .optim import InfSGD
from .parameters import owner_of
from .rows import RowStore

__all__ = ["PiSGD", "F00ReLUsqrt", "F11ReLUsqrt", "F02ReLUsqrt", "J1", "store_pi_grad_norm_", "owner_of"]

PiSGD = InfSGD


def F00ReLUsqrt(c, vsqrt=1.0, v2sqrt=1.0):
    """``E[φ(z1) φ(z2)]`` for standard deviations ``vsqrt``, ``v2sqrt`` and correlation ``c``."""
    return F00(c) * vsqrt * v2sqrt


def F11ReLUsqrt(c, vsqrt=None, v2sqrt=None):
    """``E[φ'(z1) φ'(z2)]``; independent of the variances."""
    return F11(c)


def F02ReLUsqrt(c, vsqrt=1.0, v2sqrt=1.0):
    """``E[φ(z1) φ''(z2)] = sqrt(v (1-c²) / v2) / (2π)`` for standard deviations ``vsqrt``, ``v2sqrt``."""
    return F02(c) * vsqrt / v2sqrt


def J1(c):
    """The arc-cosine kernel of degree 1 normalised to ``J1(1) = 1``: ``2 F00(c)``."""
    return 2.0 * F00(c)


def store_pi_grad_norm_(modules: Iterable[nn.Module] | nn.Module) -> dict[str, float]:
    """Compute and store the gradient norm of every π-layer's weight (``layer.pi_grad_norm``).

    The original library's two-call idiom; :func:`inf.clip.clip_grad_norm_` computes the
    same norms itself, so calling this first is optional. Returns ``{layer name: norm}``.
    """
    if isinstance(modules, nn.Module):
        modules = modules.modules()
    norms = {}
    for m in modules:
        if isinstance(m, InfPiLinearReLU):
            weight, name = m.coefficients, m.name
        elif isinstance(m, _FinPiLayer):
            weight, name = m.weight, repr(m)
        else:
            continue
        found = pi_grad_norms([weight])
        m.pi_grad_norm = float(found[0][1]) if found else 0.0
        norms[name] = m.pi_grad_norm
    return norms


def _install_attribute_aliases():
    RowStore.Amult = property(lambda self: self.coefficients, doc="Alias of ``coefficients``.")
    InfPiLinearReLU.Amult = property(lambda self: self.rows.coefficients, doc="Alias of ``coefficients``.")


_install_attribute_aliases()
