"""Every public name of ``eapm.losses`` evaluated on small tensors, in plain PyTorch.

``evaluate()`` returns ``{name: [...]}`` for each name of ``eapm.losses.__all__``: for a
loss, its value(s) and the sum of its gradient w.r.t. the prediction, plus whether every
value and gradient is finite; for a helper, what it returns. Importing this file imports
only torch and ``eapm.losses``.

Run as a script (``python every_loss.py MODE``) it first makes detectron2 (and fvcore, its
dependency) impossible to import, then prints one JSON line: the results, whether
``eapm`` saw detectron2, the detectron2 / fvcore modules that got loaded anyway, and the
error ``eapm.load_config`` raises. MODE: ``finder`` (a finder on ``sys.meta_path`` refuses
them) or ``none`` (``sys.modules[name] = None``).
"""

from __future__ import annotations

import importlib.abc
import json
import math
import sys

BLOCKED = ("detectron2", "fvcore")


class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)", name=fullname)
        return None


def block(mode: str) -> None:
    """Makes the ``BLOCKED`` packages impossible to import in this process."""
    if mode == "finder":
        sys.meta_path.insert(0, _Refuse())
    elif mode == "none":
        for name in BLOCKED:
            sys.modules[name] = None
    else:
        raise ValueError(f"mode must be 'finder' or 'none', got {mode!r}")


def _finite(*tensors) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _run(fn, *inputs):
    """``fn`` on copies of ``inputs`` that require grad, and the backward of the sum of its
    output(s): the sums of the outputs ("values"), of the gradients ("grads") and of their
    absolute values ("grad_abs"), and whether all of them are finite ("finite")."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    total = sum(o.sum() for o in outs if o.requires_grad)
    total.backward()
    grads = [x.grad for x in leaves]
    return {
        "values": [float(o.double().sum()) for o in outs],
        "grads": [float(g.double().sum()) for g in grads],
        "grad_abs": [float(g.double().abs().sum()) for g in grads],
        "finite": _finite(*outs, *grads),
    }


def evaluate() -> dict:
    import torch
    import torch.nn.functional as F

    import eapm.losses as L

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g) * 3
    onehot = (torch.rand(6, 5, generator=g) < 0.3).float()
    labels = torch.tensor([0, 4, 2, 5, 1, 3])  # 5: background of 5 foreground classes
    ce_logits = torch.randn(6, 6, generator=g) * 2
    deltas = torch.randn(6, 4, generator=g)
    target_deltas = torch.randn(6, 4, generator=g)
    obj = torch.randn(8, generator=g) * 2
    obj_t = (torch.rand(8, generator=g) < 0.5).float()

    r = {}
    with torch.no_grad():
        r["difficulty"] = float(L.difficulty(logits, onehot).sum())
        r["gap_over_sum"] = float(L.gap_over_sum(deltas, target_deltas).sum())
        r["modulating_factor"] = float(
            L.modulating_factor(torch.tensor([0.0, 0.5, 1.0]), 1.5).sum()
        )
        r["ghm_bin_index"] = L.ghm_bin_index(
            torch.tensor([0.0, 0.05, 0.5, 1.0]), torch.linspace(0, 1, 11)
        ).tolist()
    r["sigmoid_focal_loss"] = _run(
        lambda x: L.sigmoid_focal_loss(x, onehot, reduction="sum"), logits
    )
    r["eapm_sigmoid_focal_loss"] = _run(
        lambda x: L.eapm_sigmoid_focal_loss(x, onehot, 1.5, reduction="sum"), logits
    )
    r["eapm_focal_terms"] = _run(lambda x: L.eapm_focal_terms(x, onehot, 1.5), logits)
    r["eapm_focal_loss_sum_with_stats"] = _run(
        lambda x: L.eapm_focal_loss_sum_with_stats(x, onehot, 1.5), logits
    )
    r["balanced_l1_loss"] = _run(
        lambda t: L.balanced_l1_loss(t, target_deltas, reduction="sum"), deltas
    )
    r["eapm_balanced_l1_loss"] = _run(
        lambda t: L.eapm_balanced_l1_loss(t, target_deltas, 1.0, reduction="sum"), deltas
    )
    r["eapm_cross_entropy"] = _run(lambda x: L.eapm_cross_entropy(x, labels, 1.5), ce_logits)
    r["eapm_ce_stats"] = [float(t.sum()) for t in L.eapm_ce_stats(ce_logits, labels, 1.5)]
    r["eapm_binary_cross_entropy_with_logits"] = _run(
        lambda x: L.eapm_binary_cross_entropy_with_logits(x, obj_t, 1.5), obj
    )
    r["GHMC"] = _run(lambda x: L.GHMC()(x, onehot), logits)
    r["GHMR"] = _run(lambda t: L.GHMR()(t, target_deltas), deltas)
    # the general recipe: one base loss per link
    r["eapm_loss"] = {
        "identity": _run(
            lambda t: L.eapm_loss(
                lambda p, y: F.smooth_l1_loss(p, y, beta=0.1, reduction="sum"),
                "gap_over_sum",
                1.0,
            )(t, target_deltas),
            deltas,
        ),
        "sigmoid": _run(
            lambda x: L.eapm_loss(
                lambda p, y: F.binary_cross_entropy_with_logits(p, y, reduction="sum"),
                "difficulty",
                1.5,
                "sigmoid",
            )(x, onehot),
            logits,
        ),
        "softmax": _run(
            lambda x: L.eapm_loss(F.cross_entropy, "difficulty", 1.5, "softmax")(x, labels),
            ce_logits,
        ),
    }
    r["modulate_prediction"] = _run(
        lambda t: L.modulate_prediction(t, target_deltas, "gap_over_sum", 1.0)[0], deltas
    )
    # the helpers
    r["LINKS"] = list(L.LINKS)
    r["check_eapm_param"] = L.check_eapm_param(1.5, "mu")
    r["check_balanced_l1_params"] = L.check_balanced_l1_params(0.5, 1.5, 0.11)
    r["check_ghm_params"] = L.check_ghm_params(bins=30, momentum=0.75)
    r["clear_compiled_kernels"] = L.clear_compiled_kernels()
    r["compiled_kernel_state"] = L.compiled_kernel_state("_focal_sum")
    # the reference: focal loss of one logit 0 with target 1 is alpha (1/2)^2 log 2
    r["focal_at_0"] = float(L.sigmoid_focal_loss(torch.zeros(1), torch.ones(1)).sum())
    r["focal_at_0_expected"] = 0.25 * 0.25 * math.log(2.0)
    return r


def main(mode: str) -> None:
    block(mode)
    import eapm

    results = evaluate()
    try:
        eapm.load_config
        error = None
    except ImportError as e:
        error = f"{type(e).__name__}: {e}"
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m])
    print(
        json.dumps(
            {
                "results": results,
                "has_detectron2": eapm.HAS_DETECTRON2,
                "loaded": loaded,
                "load_config_error": error,
                "eapm_file": eapm.__file__,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
