"""The merge rules of the online merging optimizer (Lu et al. 2024a), as pure tensor functions.

Input: a parameter's base-optimizer update ``delta`` and its (sparsified) reference delta ``tau``.
Output: the update to apply instead (``merged_update``): OnDARE (random drop + rescale) or
OnTIES (top-k by magnitude + sign election). ``topk_mask`` / ``dare_mask`` are the
sparsifiers, shared with ``posttrain.core.merging.sparse``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from posttrain.core.merging.sparse import SparseTau

METHODS = ("ondare", "onties")


# ---------------------------------------------------------------- pure rules

def _kept_count(numel: int, keep_rate: float) -> int:
    # The reference's count (online_merging/optimizers.py, OTAdamW.magnitude_mask_): k = int(p * n),
    # and a tensor with k < 1 is not sparsified at all (kept whole), e.g. a small bias at p = 1e-2.
    if keep_rate >= 1:
        return numel
    k = int(keep_rate * numel)
    return numel if k < 1 else k


def topk_mask(x: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """Boolean mask of the ``int(keep_rate * numel)`` entries of ``x`` largest in magnitude (all when that is 0)."""
    import torch

    flat = x.reshape(-1)
    k = _kept_count(flat.numel(), keep_rate)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=x.device)
    if k == flat.numel():
        mask.fill_(True)
    elif k:
        mask[torch.topk(flat.abs().float(), k, sorted=False).indices] = True
    return mask.view_as(x)


def dare_mask(x: torch.Tensor, keep_rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean Bernoulli(keep_rate) mask shaped like ``x`` (all True when keep_rate is 1)."""
    import torch

    if keep_rate >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    return torch.rand(x.shape, generator=generator, device=x.device) < keep_rate


def merged_update(delta: torch.Tensor, tau: torch.Tensor | SparseTau, *, method: str, keep_rate: float,
                  alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The update to add to a parameter instead of the base optimizer's ``delta``.

    ``tau`` is the already sparsified reference delta: a dense tensor shaped like
    ``delta`` (zeros where dropped) or a ``SparseTau`` over ``delta``'s flat
    entries (same result, without materialising the zeros). ``keep_rate == 1``
    is deterministic: OnDARE returns ``alpha*tau + (1-alpha)*delta``; OnTIES
    keeps per entry the terms whose sign agrees with the elected sign of
    ``tau + delta`` (``+`` where the sum is 0, as in the reference), weighted by
    ``alpha`` and ``1-alpha``. With ``keep_rate < 1`` OnDARE drops entries of
    ``delta`` at random (``generator``) and rescales the kept ones by
    ``1/keep_rate``; OnTIES keeps the ``int(keep_rate * numel)`` entries of
    ``delta`` largest in magnitude (all of them when that is 0). Weight decay is
    not part of this rule: the wrapper applies it after the merged update.
    """
    import torch

    if method not in METHODS:
        raise ValueError(f"merged_update: method must be one of {METHODS}, got {method!r}")
    if not 0 < keep_rate <= 1:
        raise ValueError(f"merged_update: keep_rate must be in (0, 1], got {keep_rate}")
    sparse = _is_sparse(tau)
    if sparse and tau.indices is None:
        tau, sparse = tau.values.view(delta.shape), False
    if (tau.numel != delta.numel()) if sparse else (tau.shape != delta.shape):
        shape = (tau.numel,) if sparse else tuple(tau.shape)
        raise ValueError(f"merged_update: tau shape {shape} != delta shape {tuple(delta.shape)}")
    out_dtype = delta.dtype
    # Work in fp32: alpha ~ 1e-7 times a bf16 tau would vanish below bf16 resolution.
    d = delta.float()
    if method == "ondare":
        if keep_rate < 1:
            # D(delta): Bernoulli(p) keep mask drawn afresh at every step, kept entries rescaled by 1/p.
            d = torch.empty_like(d).bernoulli_(keep_rate, generator=generator).mul_(d).mul_(1.0 / keep_rate)
        if not sparse:
            return (alpha * tau.to(device=d.device, dtype=torch.float32) + (1 - alpha) * d).to(out_dtype)
        out = d.mul(1 - alpha).reshape(-1)
        out.index_add_(0, tau.indices.to(device=d.device, dtype=torch.long),
                       tau.values.to(device=d.device, dtype=torch.float32), alpha=alpha)
        return out.view(delta.shape).to(out_dtype)
    if keep_rate < 1:
        d = d * topk_mask(d, keep_rate)
    if not sparse:
        return _elect(tau.to(device=d.device, dtype=torch.float32), d, alpha).to(out_dtype)
    # Where tau is 0 the elected sign is delta's own (or delta is 0), so delta is kept whole there:
    # elect on tau's entries only.
    out = d.mul(1 - alpha).reshape(-1)
    idx = tau.indices.to(device=d.device, dtype=torch.long)
    out[idx] = _elect(tau.values.to(device=d.device, dtype=torch.float32), d.reshape(-1)[idx], alpha)
    return out.view(delta.shape).to(out_dtype)


def _elect(t: torch.Tensor, d: torch.Tensor, alpha: float) -> torch.Tensor:
    """TIES sign election: ``alpha*t*[t agrees] + (1-alpha)*d*[d agrees]`` with the elected sign of ``t + d``."""
    import torch

    # The reference elects + where t + d == 0 (OTAdamW.step: (sum >= 0) * 2 - 1), so of two
    # opposite terms that cancel exactly, the positive one is kept.
    s = torch.where((t + d) >= 0, 1.0, -1.0).to(t.dtype)
    # x agrees with s exactly when x*s > 0 (a zero term contributes nothing either way)
    out = (t * s).gt_(0).mul_(t).mul_(alpha)
    return out.addcmul_((d * s).gt_(0), d, value=1 - alpha)


def _is_sparse(tau: object) -> bool:
    return type(tau).__name__ == "SparseTau"
