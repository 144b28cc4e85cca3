"""What a detectron2 component can honour and which config rules it owns, declared by its
class (this module imports nothing of the package: the models import it, the config
validation asks it).

The config validation (``eapm.validation.validate_config``) asks the *registered class*
(``issubclass``), never its name, whether it honours an EAPM switch, so a user's own
subclass of an EAPM model inherits its capabilities, and a class that cannot honour a
switched-on key is rejected with a ``ValueError`` naming the key.

One owner per rule: a rule about a value is written once, as a function of the module that
uses the value (``eapm.modeling``). The constructor applies it to its argument; the class
declares it here for its config key (``DeclaresConfigChecks.config_checks``, the
``check_*`` classmethods of the mixins) and the validation applies the same function to the
key when the config is loaded, re-raising its ``ValueError`` as
``Invalid config KEY = VALUE: <the function's message>``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

__all__ = [
    "ConfigCheck",
    "DeclaresConfigChecks",
    "SupportsEAPMFocal",
    "SupportsEAPMBalancedL1",
    "SupportsEAPMSoftmaxCE",
    "SupportsEAPMObjectness",
    "SupportsGHM",
    "DenseHeadNorm",
]

# check(value) -> anything; raises ValueError (its message need not name the key)
ConfigCheck = Callable[[Any], Any]


class DeclaresConfigChecks:
    """Mixin of the classes whose ``from_config`` reads config keys.

    ``config_checks()`` maps each key whose value has a rule to the function that owns the
    rule: the function the constructor applies to the argument made from the key, or, for a
    key only ``from_config`` reads (a switch, the size of a sub-module), the rule it relies on.
    The validation runs the checks of every *registered* class that declares them, whatever
    the config chooses (a key's value must suit each class that reads it), once per distinct
    ``(key, check)`` pair, so equal checks inherited or shared by several classes run once.
    A backbone builder function declares the same as an attribute ``config_checks``.
    """

    @classmethod
    def config_checks(cls) -> Dict[str, ConfigCheck]:
        return {}


class SupportsEAPMFocal:
    """Mixin of the meta-architectures whose classification loss can be EAPM focal loss:
    they honour ``MODEL.EAPM.CLS.*``."""


class SupportsEAPMBalancedL1:
    """Mixin of the modules whose box regression loss can be the (EAPM) balanced L1 loss:
    they honour the box loss type ``"balanced_l1"``, ``MODEL.BALANCED_L1.*`` and
    ``MODEL.EAPM.REG.*``.

    ``box_loss_key`` is the config key that selects the class's box loss type;
    ``eapm_box_losses`` the box loss types EAPM regression can modulate in this class
    (balanced L1; the R-CNN ROI heads also detectron2's IoU losses, on modulated deltas).
    """

    box_loss_key: str = ""
    eapm_box_losses: Tuple[str, ...] = ("balanced_l1",)

    @classmethod
    def check_box_loss(cls, box_loss_type: str, eapm_reg_theta: float) -> None:
        """Raise ``ValueError`` if EAPM regression (``eapm_reg_theta > 0``) is asked of a
        box loss that is not in ``eapm_box_losses``."""
        if eapm_reg_theta > 0 and box_loss_type not in cls.eapm_box_losses:
            if tuple(cls.eapm_box_losses) == ("balanced_l1",):
                needs = "the 'balanced_l1' box loss"
            else:
                needs = f"one of the box losses {tuple(cls.eapm_box_losses)}"
            raise ValueError(
                f"EAPM regression (MODEL.EAPM.REG.ENABLED, theta {eapm_reg_theta}) needs "
                f"{needs} ({cls.box_loss_key}), got {box_loss_type!r}"
            )


class SupportsEAPMSoftmaxCE:
    """Mixin of the ROI heads (and their box predictors) whose softmax box classification loss
    can be EAPM cross entropy (``eapm.losses.eapm_cross_entropy``): for an R-CNN model they
    honour ``MODEL.EAPM.CLS.*``, in every box predictor they have (every cascade stage)."""

    @classmethod
    def check_cls_loss(cls, use_sigmoid_ce: bool, eapm_cls_mu: float) -> None:
        """Raise ``ValueError`` if EAPM cross entropy (``eapm_cls_mu > 0``) is asked of a box
        predictor whose classification is per-class sigmoid (``use_sigmoid_ce`` True,
        ``MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE``): EAPM modulates the softmax cross entropy."""
        if use_sigmoid_ce and eapm_cls_mu > 0:
            raise ValueError(
                "EAPM cross entropy (MODEL.EAPM.CLS.ENABLED, mu "
                f"{eapm_cls_mu}) modulates the softmax classification: it needs use_sigmoid_ce "
                "False (MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE)"
            )


class SupportsEAPMObjectness:
    """Mixin of the proposal generators (RPNs) whose objectness loss can be EAPM binary cross
    entropy (``eapm.losses.eapm_binary_cross_entropy_with_logits``): they honour
    ``MODEL.EAPM.RPN.*``."""


class SupportsGHM:
    """Mixin of the dense meta-architectures whose losses can be GHM-C (classification,
    ``MODEL.GHM.CLS.*``) and GHM-R (the box loss type ``"ghm_r"``, ``MODEL.GHM.REG.*``),
    with ``MODEL.GHM.ALL_REDUCE`` and ``MODEL.GHM.PER_LEVEL``."""

    @classmethod
    def check_ghm_cls(cls, ghm_cls: bool, eapm_cls_mu: float) -> None:
        """Raise ``ValueError`` if GHM-C (``ghm_cls`` True) is asked together with EAPM focal
        loss (``eapm_cls_mu > 0``): GHM-C replaces the focal loss that EAPM modulates."""
        if ghm_cls and eapm_cls_mu > 0:
            raise ValueError(
                "GHM-C (ghm_cls, MODEL.GHM.CLS.ENABLED) replaces the focal loss that EAPM "
                "modulates: it needs eapm_cls_mu 0 (MODEL.EAPM.CLS.ENABLED False), got "
                f"{eapm_cls_mu}"
            )


class DenseHeadNorm:
    """Mixin of the dense meta-architectures whose head normalisation is a config key.

    ``head_norm_key`` is that key ("BN" there needs 2 images per process: the training
    checks ask for it); ``check_head_norm(norm, channels)`` raises ``ValueError`` if the head
    cannot use ``norm`` on features of ``channels`` channels (``MODEL.FPN.OUT_CHANNELS``);
    by default it accepts every norm."""

    head_norm_key: str = ""

    @classmethod
    def check_head_norm(cls, norm: str, channels: int) -> None:
        return None
