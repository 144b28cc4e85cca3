"""EAPM losses: focal loss and balanced L1 loss with example attribute based prediction
modulation (Wu et al., "Deep object detection with example attribute based prediction
modulation", Sec. 2), and the GHM losses the paper compares with. Pure torch, no detectron2
import.

Map of the package (every name below is importable from ``eapm.losses``):

* ``attributes``  the example attributes and the factor: ``difficulty`` (Dif),
  ``gap_over_sum`` (GoS), ``modulating_factor`` (MF = 1 + tanh(s) - tanh(s * attribute)),
  ``check_eapm_param`` (a strength mu / theta: a finite number >= 0).
* ``runtime``     the kernel runtime: float32-or-wider policy, reductions, the closed-form
  autograd attach, the registry of fused elementwise kernels, their ``torch.compile``
  cache (``clear_compiled_kernels``, ``compiled_kernel_state``) and the CPU chunking.
* ``focal``       ``sigmoid_focal_loss``, ``eapm_sigmoid_focal_loss``, ``eapm_focal_terms``,
  ``eapm_focal_loss_sum_with_stats`` (one fused kernel).
* ``balanced_l1`` ``balanced_l1_loss``, ``eapm_balanced_l1_loss``,
  ``check_balanced_l1_params`` (one fused kernel).
* ``cross_entropy`` ``eapm_cross_entropy`` (softmax, R-CNN box classification),
  ``eapm_ce_stats`` (its Dif and MF, for histograms), ``eapm_binary_cross_entropy_with_logits``
  (RPN objectness); ``mu == 0`` is the torch function itself.
* ``general``     the paper's recipe around any base loss: ``modulate_prediction`` (the
  straight-through modulated prediction) and ``eapm_loss`` (a base loss -> its EAPM
  version), whose ``attribute`` is ``"difficulty"``, ``"gap_over_sum"`` or a callable and
  whose ``factor`` is a strength s (``modulating_factor(EA, s)``) or a callable; ``LINKS``.
* ``ghm``         ``GHMC``, ``GHMR``, ``check_ghm_params``, ``ghm_bin_index`` (Li, Liu, Wang,
  AAAI 2019).

Gradient semantics (paper Sec. 2.1): the loss value is the base loss evaluated at the
modulated prediction, and the gradient that reaches the raw network output is the *base*
loss's gradient evaluated at the modulated point:

    dL/dx|_{x0}  ->  dL/dx|_{x0'},   x0' = logit(p* + MF * (p0 - p*))
    dL/dt|_{t0}  ->  dL/dt|_{t0'},   t0' = t* + MF * (t0 - t*)

The modulating factor MF is not differentiated. The fused EAPM losses are custom autograd
functions whose forward computes the value *and* the closed-form gradient in one pass (the
backward is one multiply), always in float32 or wider, whatever the input dtype or autocast
state.
"""

from .attributes import check_eapm_param, difficulty, gap_over_sum, modulating_factor
from .balanced_l1 import balanced_l1_loss, check_balanced_l1_params, eapm_balanced_l1_loss
from .cross_entropy import eapm_binary_cross_entropy_with_logits, eapm_ce_stats, eapm_cross_entropy
from .focal import (
    eapm_focal_loss_sum_with_stats,
    eapm_focal_terms,
    eapm_sigmoid_focal_loss,
    sigmoid_focal_loss,
)
from .general import LINKS, eapm_loss, modulate_prediction
from .ghm import GHMC, GHMR, check_ghm_params, ghm_bin_index
from .runtime import clear_compiled_kernels, compiled_kernel_state

# private names that tests use through ``eapm.losses`` (the kernel registry, the chunking)
from .runtime import _EAGER_KERNELS, _run_chunked  # noqa: F401  isort: skip

__all__ = [
    "difficulty",
    "gap_over_sum",
    "modulating_factor",
    "sigmoid_focal_loss",
    "eapm_sigmoid_focal_loss",
    "balanced_l1_loss",
    "eapm_balanced_l1_loss",
    "eapm_focal_terms",
    "eapm_focal_loss_sum_with_stats",
    "check_eapm_param",
    "check_balanced_l1_params",
    "check_ghm_params",
    "ghm_bin_index",
    "GHMC",
    "GHMR",
    "clear_compiled_kernels",
    "compiled_kernel_state",
    "eapm_cross_entropy",
    "eapm_ce_stats",
    "eapm_binary_cross_entropy_with_logits",
    "LINKS",
    "modulate_prediction",
    "eapm_loss",
]
