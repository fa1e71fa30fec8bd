"""Online merging optimizer (OnDARE / OnTIES, Lu et al. 2024a) for DPO, online DPO and SFT.

Inputs: an inner torch optimizer (AdamW by default), the model's named
parameters, and the reference delta ``tau = theta_ref - theta_base`` built
from two checkpoints (the policy's starting weights, i.e. the SFT model, and
the pre-trained base) or given directly as ``{name: tensor}``.
Output: ``MergingOptimizer``, a drop-in optimizer whose step replaces each
parameter's update ``Delta`` (what the inner optimizer just did) by
``merged_update(Delta, tau)``:

* OnDARE: ``alpha * D(tau) + (1 - alpha) * D(Delta)``; D drops entries at
  random with keep rate p and rescales the kept ones by 1/p. The mask on tau
  is drawn once at start (and D(tau) clamped to [-1, 1]), the mask on Delta
  at every step.
* OnTIES: keep the ``int(p * n)`` entries largest in magnitude of tau (once)
  and of Delta (every step; a tensor with ``int(p * n) == 0`` is kept whole),
  elect the sign of ``tau' + Delta'`` per entry (+ on a tie), zero the terms
  whose sign disagrees, then ``alpha * tau'' + (1 - alpha) * Delta''``.

Delta is the inner optimizer's update without its decoupled weight decay;
the decay is applied after the merge to every weight of a decaying param
group, ``theta = (theta + merged) * (1 - lr * weight_decay)``. All of these
follow the reference implementation (QwenLM/online_merging_optimizers).

tau is sparsified once and stored sparsely (int32 flat indices + fp32 values),
so its memory is about ``2 * keep_rate`` of the fp32 parameter memory, never a
full copy. The snapshot needed to measure Delta is taken one chunk of
parameters at a time (``chunk_numel``), so the transient memory is bounded.

DeepSpeed ZeRO-1/2/3: the engine hands the inner optimizer flat fp32
partitions instead of named parameters. The wrapper, passed to
``deepspeed.initialize`` (or created inside an HF/TRL trainer before
accelerate prepares it), finds at its first step where each named
parameter's local slice lies in those flat tensors (ZeRO-1/2: the parameter's
``_hp_mapping`` fragment; ZeRO-3: the optimizer's ``grad_position`` and the
rank's partition), and merges slice by slice inside the engine's step, before
DeepSpeed copies fp32 masters to the model weights. OnDARE is exactly the same
rule per element; OnTIES's top-p of Delta is taken per local slice (per
parameter when not partitioned), an approximation that the public FSDP
implementation also makes.

Defaults from the paper: keep rate 1e-2 (robust down to 5e-4), alpha about
1e-7..5e-7 (>= 5e-5 is unstable), used with DPO learning rates 5e-7..1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from posttrain.core.config import key
from posttrain.core.merging.rules import METHODS, dare_mask, merged_update, topk_mask
from posttrain.core.merging.sparse import (
    SparseTau,
    sparsify,
    sparsify_all,
    tau_from_checkpoints,
)


@dataclass
class MergingConfig:
    """Recipe key ``merging:`` of the ``dpo``, ``online_dpo`` and ``sft`` stages (null = plain optimizer)."""

    method: Literal["ondare", "onties"] = key("ondare", "OnDARE (random drop + rescale) or OnTIES (top-k + sign election)")
    keep_rate: float = key(1e-2, "p: fraction of tau and of each update kept (paper: 1e-2, robust down to 5e-4)")
    alpha: float = key(3e-7, "weight of tau in each merged step (paper: 1e-7..5e-7; >= 5e-5 unstable)")
    base_model: str | None = key(None, "theta_base: the pre-trained model (folder or hub id); default: the recipe's "
                                 "model.base", model=True)
    reference_model: str | None = key(None, "theta_ref (folder or hub id); default: the stage's starting policy (the "
                                      "SFT model)", model=True)
    seed: int = key(0, "seeds the once-drawn tau mask and the per-step update masks")
    chunk_numel: int = key(1 << 27, "parameters stepped together: bounds the transient snapshot memory")

    def check(self) -> None:
        """Reject values outside the method's domain."""
        if not 0 < self.keep_rate <= 1:
            raise ValueError(f"merging.keep_rate must be in (0, 1], got {self.keep_rate}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"merging.alpha must be in [0, 1), got {self.alpha}")
        if self.chunk_numel < 1:
            raise ValueError("merging.chunk_numel must be >= 1")



def __getattr__(name: str) -> Any:
    if name == "MergingOptimizer":
        from posttrain.core.merging.optimizer import optimizer_class

        return optimizer_class()
    if name in ("optimizer_class", "wrap_optimizer", "patch_trainer", "check_model", "resolve_paths", "describe"):
        from posttrain.core.merging import optimizer

        return getattr(optimizer, name)
    raise AttributeError(name)


__all__ = [
    "METHODS",
    "MergingConfig",
    "MergingOptimizer",
    "SparseTau",
    "check_model",
    "dare_mask",
    "describe",
    "merged_update",
    "optimizer_class",
    "patch_trainer",
    "resolve_paths",
    "sparsify",
    "sparsify_all",
    "tau_from_checkpoints",
    "topk_mask",
    "wrap_optimizer",
]
