"""The reference delta tau = theta_ref - theta_base, sparsified once and stored sparsely.

Input: two HF checkpoint folders (safetensors or pytorch_model*.bin) or full tensors.
Output: ``{parameter name: SparseTau}`` (int32 flat indices + fp32 values, about
``2 * keep_rate`` of the fp32 parameter memory), built tensor by tensor so no second full
model is ever held. OnDARE's tau is the DARE-rescaled ``tau / p`` clamped to ``[-TAU_CLIP, TAU_CLIP]``;
OnTIES's tau is the top-p entries unscaled and unclamped (both as in the reference implementation).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.core.merging.rules import METHODS, dare_mask, topk_mask

if TYPE_CHECKING:
    import torch

# The reference (online_merging/optimizers.py, ODAdamW.init_ref_param_diff, clip_val=1) clamps
# OnDARE's rescaled tau to [-1, 1] (a stability guard: 1/p can blow tau up); its OnTIES tau is not clamped.
TAU_CLIP = 1.0

# ---------------------------------------------------------------- sparse tau

@dataclass
class SparseTau:
    """A flat sparse vector of ``numel`` entries: ``values`` at ``indices`` (dense when ``indices`` is None)."""

    numel: int
    indices: torch.Tensor | None
    values: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held (indices + values)."""
        n = self.values.numel() * self.values.element_size()
        if self.indices is not None:
            n += self.indices.numel() * self.indices.element_size()
        return n

    def dense(self, device=None) -> torch.Tensor:
        """The flat fp32 dense vector (a temporary the size of the slice)."""
        import torch

        if self.indices is None:
            return self.values.to(device=device, dtype=torch.float32)
        out = torch.zeros(self.numel, dtype=torch.float32, device=device)
        out[self.indices.to(device=device, dtype=torch.long)] = self.values.to(device=device, dtype=torch.float32)
        return out

    def slice(self, start: int, length: int) -> SparseTau:
        """Entries in ``[start, start+length)``, re-indexed from 0 (a rank's slice of a parameter)."""
        if start == 0 and length == self.numel:
            return self
        if self.indices is None:
            return SparseTau(length, None, self.values[start:start + length].clone())
        sel = (self.indices >= start) & (self.indices < start + length)
        return SparseTau(length, (self.indices[sel] - start).to(self.indices.dtype), self.values[sel].clone())


def sparsify(tau: torch.Tensor, method: str, keep_rate: float, generator: torch.Generator | None = None) -> SparseTau:
    """Sparsify a full tau once.

    OnDARE: random Bernoulli(p) mask, kept values rescaled by 1/p, then clamped to
    ``[-TAU_CLIP, TAU_CLIP]`` (also when p is 1). OnTIES: the ``int(p * numel)`` entries
    largest in magnitude (all when that is 0), unscaled.
    """
    import torch

    if method not in METHODS:
        raise ValueError(f"sparsify: method must be one of {METHODS}, got {method!r}")
    flat = tau.detach().reshape(-1).float()
    if keep_rate >= 1:
        vals = flat.clamp(-TAU_CLIP, TAU_CLIP) if method == "ondare" else flat.clone()
        return SparseTau(flat.numel(), None, vals)
    if method == "ondare":
        keep = dare_mask(flat, keep_rate, generator)
        vals = (flat[keep] / keep_rate).clamp_(-TAU_CLIP, TAU_CLIP)
    else:
        keep = topk_mask(flat, keep_rate)
        vals = flat[keep]
    idx_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    idx = keep.nonzero().squeeze(1).to(idx_dtype)
    return SparseTau(flat.numel(), idx, vals.contiguous())


def _name_seed(seed: int, name: str) -> int:
    # Every rank must draw the same tau mask for a parameter: seed it by name, not by order or rank.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def sparsify_all(taus: Iterable[tuple[str, torch.Tensor]], method: str, keep_rate: float, seed: int = 0) -> dict[str, SparseTau]:
    """Sparsify each named full tau with a mask seeded by (seed, name)."""
    import torch

    out = {}
    for name, t in taus:
        g = torch.Generator(device=t.device).manual_seed(_name_seed(seed, name))
        out[name] = sparsify(t, method, keep_rate, g)
    return out


# ---------------------------------------------------------------- tau from checkpoints

def iter_checkpoint(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a HF model folder's safetensors (or pytorch_model*.bin) one at a time."""
    import torch

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"merging: checkpoint folder not found: {path}")
    files = sorted(p.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    yield k, fh.get_tensor(k)
        return
    bins = sorted(p.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"merging: no *.safetensors or pytorch_model*.bin in {path}")
    for f in bins:
        yield from torch.load(f, map_location="cpu", weights_only=True).items()


def _match_names(param_names: list[str], ckpt_names: Iterable[str]) -> dict[str, str]:
    """checkpoint key -> parameter name; parameter names may carry wrapper prefixes (module., base_model.model.)."""
    out = {}
    by_key = set(ckpt_names)
    for n in param_names:
        parts = n.split(".")
        for i in range(len(parts)):
            k = ".".join(parts[i:])
            if k in by_key:
                out[k] = n
                break
    return out


def tau_from_checkpoints(reference: str | Path, base: str | Path, param_names: list[str], method: str,
                         keep_rate: float, seed: int = 0) -> dict[str, SparseTau]:
    """Sparse ``tau = theta_ref - theta_base`` for the named parameters, streamed tensor by tensor."""
    import torch

    base_ckpt, ref_ckpt = _Checkpoint(base), _Checkpoint(reference)
    name_of = _match_names(param_names, ref_ckpt.index)
    missing = [n for n in param_names if n not in name_of.values()]
    if missing:
        raise ValueError(f"merging: reference {reference} has no tensor for parameter(s) {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}")
    out: dict[str, SparseTau] = {}
    for key, pname in name_of.items():
        if key not in base_ckpt.index:
            raise ValueError(f"merging: base model {base} has no tensor {key!r} (is it the same architecture?)")
        r, b = ref_ckpt.get(key), base_ckpt.get(key)
        if r.shape != b.shape:
            raise ValueError(f"merging: {key}: reference shape {tuple(r.shape)} != base shape {tuple(b.shape)}")
        t = r.float() - b.float()
        g = torch.Generator().manual_seed(_name_seed(seed, pname))
        out[pname] = sparsify(t, method, keep_rate, g)
    return out


class _Checkpoint:
    """Random access to the tensors of a checkpoint folder.

    safetensors: the index is read from the headers and each tensor is memory-mapped on demand.
    pytorch_model*.bin: each shard is unpickled once, when a key in it is first asked for, and
    kept only until a key of another shard is asked for (keys are asked in file order).
    """

    def __init__(self, path: str | Path):
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"merging: checkpoint folder not found: {path}")
        self.index: dict[str, Path] = {}
        self.safetensors = sorted(p.glob("*.safetensors"))
        self._shard: tuple[Path, dict] | None = None
        if self.safetensors:
            from safetensors import safe_open

            for f in self.safetensors:
                with safe_open(str(f), framework="pt") as fh:
                    self.index.update({k: f for k in fh.keys()})
            return
        bins = sorted(p.glob("pytorch_model*.bin"))
        if not bins:
            raise FileNotFoundError(f"merging: no *.safetensors or pytorch_model*.bin in {path}")
        for f in bins:
            self.index.update({k: f for k in self._load_bin(f)})

    def _load_bin(self, f: Path) -> dict:
        import torch

        if self._shard is None or self._shard[0] != f:
            self._shard = (f, torch.load(f, map_location="cpu", weights_only=True))
        return self._shard[1]

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``."""
        f = self.index[key]
        if not self.safetensors:
            return self._load_bin(f)[key]
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as fh:
            return fh.get_tensor(key)
