"""pilimit: infinite-width π-networks (Yang, Santacroce & Hu, ICLR 2022) in PyTorch.

Where things live: math (kernel functions) → rows (an infinite layer's rows and the
gradient-row protocol) → functional (the autograd Function) → layers → networks;
optim (InfSGD), clip, groups, init, device; tract; analysis/; compat (old names).
"""

__version__ = "0.2.0"

from . import compat as _compat  # noqa: F401  (installs the legacy attribute aliases)
