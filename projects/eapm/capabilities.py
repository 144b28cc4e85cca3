"""What a detectron2 component can honour, declared by its class.

The config validation (``eapm.config.validate_config``) asks the *registered class*
(``issubclass``), never its name, whether it honours an EAPM switch, so a user's own
subclass of an EAPM model inherits its capabilities, and a class that cannot honour a
switched-on key is rejected with a ``ValueError`` naming the key.
"""

from __future__ import annotations

__all__ = ["SupportsEAPMFocal", "SupportsEAPMBalancedL1", "SupportsGHM"]


class SupportsEAPMFocal:
    """Mixin of the meta-architectures whose classification loss can be EAPM focal loss:
    they honour ``MODEL.EAPM.CLS.*``."""


class SupportsEAPMBalancedL1:
    """Mixin of the modules whose box regression loss can be the (EAPM) balanced L1 loss:
    they honour the box loss type ``"balanced_l1"``, ``MODEL.BALANCED_L1.*`` and
    ``MODEL.EAPM.REG.*``.

    ``box_loss_key`` is the config key that selects the class's box loss type.
    """

    box_loss_key: str = ""

    @classmethod
    def check_box_loss(cls, box_loss_type: str, eapm_reg_theta: float) -> None:
        """Raise ``ValueError`` if EAPM regression (``eapm_reg_theta > 0``) is asked of a
        box loss other than balanced L1 (EAPM modulates the balanced L1 loss's deltas)."""
        if eapm_reg_theta > 0 and box_loss_type != "balanced_l1":
            raise ValueError(
                f"EAPM regression (MODEL.EAPM.REG.ENABLED, theta {eapm_reg_theta}) needs the "
                f"'balanced_l1' box loss ({cls.box_loss_key}), got {box_loss_type!r}"
            )


class SupportsGHM:
    """Mixin of the dense meta-architectures whose losses can be GHM-C (classification,
    ``MODEL.GHM.CLS.*``) and GHM-R (the box loss type ``"ghm_r"``, ``MODEL.GHM.REG.*``),
    with ``MODEL.GHM.ALL_REDUCE`` and ``MODEL.GHM.PER_LEVEL``."""
