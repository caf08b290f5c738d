"""Training-dynamics analysis: projected NTKs, the exact tangent kernel of infinite π-nets,
and the decomposition of a training trajectory on a kernel's eigenbasis.

See docs/analysis.md. Modules:

* :mod:`inf.analysis.pntk` — per-example gradients of any model, randomly projected
  (a sparse CountSketch by default, or TRAK's dense projectors) and stored in a resumable
  memory-mapped file; trace-, pseudo- and full NTKs (cosine-normalised on request), top-k
  similar training examples, kernel surrogate models (logistic, ridge, kSVM, kGLM).
* :mod:`inf.analysis.projectors` — :class:`SparseJLProjector`, O(P) per example, no P × K matrix.
* :mod:`inf.analysis.traker_tasks` — pNTK / trNTK tasks for ``trak.TRAKer`` (imported on
  demand: it needs the ``traker`` package and registers the task names ``"pNTK"``, ``"trNTK"``).
* :mod:`inf.analysis.inf_ntk` — the exact tangent kernel of an infinite π-net under InfSGD.
* :mod:`inf.analysis.decomposition` — the basis of Ma, Guo & Fattahi (2022) from a final
  network's features (``network_basis``; scalar coefficients β_i, exact gradients
  ``basis_gradients``) and kernel eigenbases (after kernel, NTK; ``β_i = φ_iᵀ f``), their
  gradients' norms and independence, a recorder for training loops and the plots.
"""

from .decomposition import (
    FunctionBasis,
    TrajectoryRecorder,
    after_kernel,
    basis_gradients,
    beta_coefficients,
    conjugate_kernel,
    eigenbasis,
    function_basis,
    gradient_gram,
    gradient_independence,
    network_basis,
    penultimate_features,
    plot_beta_curves,
    plot_beta_vs_gradnorm,
    plot_independence,
    reconstruct,
    tangent_kernel,
)
from .inf_ntk import inf_jacobians, inf_ntk, inf_ntk_diagonal
from .pntk import (
    Features,
    KernelSurrogate,
    cosine_normalize,
    empirical_ntk,
    exact_ntk,
    kernel_diagonal,
    load_features,
    make_projector,
    misclassification_overlap,
    ntk_from_features,
    ntk_over_checkpoints,
    pntk,
    pntk_features,
    projection_layout,
    resolve_lr_mults,
    save_topk_grid,
    surrogate_agreement,
    topk_similar,
    trainable_parameters,
)
from .projectors import SparseJLProjector

__all__ = [
    "pntk_features",
    "Features",
    "pntk",
    "empirical_ntk",
    "ntk_from_features",
    "kernel_diagonal",
    "topk_similar",
    "save_topk_grid",
    "KernelSurrogate",
    "surrogate_agreement",
    "resolve_lr_mults",
    "trainable_parameters",
    "make_projector",
    "exact_ntk",
    "load_features",
    "ntk_over_checkpoints",
    "cosine_normalize",
    "projection_layout",
    "misclassification_overlap",
    "SparseJLProjector",
    "inf_ntk",
    "inf_ntk_diagonal",
    "inf_jacobians",
    "eigenbasis",
    "conjugate_kernel",
    "after_kernel",
    "beta_coefficients",
    "reconstruct",
    "gradient_gram",
    "gradient_independence",
    "TrajectoryRecorder",
    "tangent_kernel",
    "plot_beta_curves",
    "plot_beta_vs_gradnorm",
    "plot_independence",
    "FunctionBasis",
    "function_basis",
    "network_basis",
    "penultimate_features",
    "basis_gradients",
]
