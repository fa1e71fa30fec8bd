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
  is drawn once at start, the mask on Delta at every step.
* OnTIES: keep the top-p fraction by magnitude of tau (once) and of Delta
  (every step), elect the sign of ``tau' + Delta'`` per entry, zero the terms
  whose sign disagrees, then ``alpha * tau'' + (1 - alpha) * Delta''``.

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

import json
import logging
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

log = logging.getLogger("posttrain")

METHODS = ("ondare", "onties")


@dataclass
class MergingConfig:
    """Recipe key ``merging:`` of the ``dpo``, ``online_dpo`` and ``sft`` stages (null = plain optimizer)."""

    method: Literal["ondare", "onties"] = "ondare"  # OnDARE (random drop + rescale) or OnTIES (top-k + sign election)
    keep_rate: float = 1e-2  # p: fraction of tau and of each update kept (paper: 1e-2, robust down to 5e-4)
    alpha: float = 3e-7  # weight of tau in each merged step (paper: 1e-7..5e-7; >= 5e-5 unstable)
    base_model: str | None = None  # theta_base folder (pre-trained model); default: the recipe's model.base
    reference_model: str | None = None  # theta_ref folder; default: the stage's starting policy (the SFT model)
    seed: int = 0  # seeds the once-drawn tau mask and the per-step update masks
    chunk_numel: int = 1 << 27  # parameters stepped together: bounds the transient snapshot memory

    def check(self) -> None:
        """Reject values outside the method's domain."""
        if not 0 < self.keep_rate <= 1:
            raise ValueError(f"merging.keep_rate must be in (0, 1], got {self.keep_rate}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"merging.alpha must be in [0, 1), got {self.alpha}")
        if self.chunk_numel < 1:
            raise ValueError("merging.chunk_numel must be >= 1")


# ---------------------------------------------------------------- pure rules

def _kept_count(numel: int, keep_rate: float) -> int:
    return min(numel, max(1, int(round(keep_rate * numel)))) if numel else 0


def topk_mask(x: "torch.Tensor", keep_rate: float) -> "torch.Tensor":
    """Boolean mask of the ``round(keep_rate * numel)`` (at least 1) entries of ``x`` largest in magnitude."""
    import torch

    flat = x.reshape(-1)
    k = _kept_count(flat.numel(), keep_rate)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=x.device)
    if k == flat.numel():
        mask.fill_(True)
    elif k:
        mask[torch.topk(flat.abs().float(), k, sorted=False).indices] = True
    return mask.view_as(x)


def dare_mask(x: "torch.Tensor", keep_rate: float, generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """Boolean Bernoulli(keep_rate) mask shaped like ``x`` (all True when keep_rate is 1)."""
    import torch

    if keep_rate >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    return torch.rand(x.shape, generator=generator, device=x.device) < keep_rate


def merged_update(delta: "torch.Tensor", tau: "torch.Tensor | SparseTau", *, method: str, keep_rate: float,
                  alpha: float, generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """The update to add to a parameter instead of the base optimizer's ``delta``.

    ``tau`` is the already sparsified reference delta: a dense tensor shaped like
    ``delta`` (zeros where dropped) or a ``SparseTau`` over ``delta``'s flat
    entries (same result, without materialising the zeros). ``keep_rate == 1``
    is deterministic: OnDARE returns ``alpha*tau + (1-alpha)*delta``; OnTIES
    keeps per entry the terms whose sign agrees with ``sign(tau + delta)``,
    weighted by ``alpha`` and ``1-alpha``. With ``keep_rate < 1`` OnDARE drops
    entries of ``delta`` at random (``generator``) and rescales the kept ones by
    ``1/keep_rate``; OnTIES keeps the top ``keep_rate`` fraction of ``delta`` by magnitude.
    """
    import torch

    if method not in METHODS:
        raise ValueError(f"merged_update: method must be one of {METHODS}, got {method!r}")
    if not 0 < keep_rate <= 1:
        raise ValueError(f"merged_update: keep_rate must be in (0, 1], got {keep_rate}")
    sparse = isinstance(tau, SparseTau)
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
        out = d.mul((1 - alpha)).reshape(-1)
        out.index_add_(0, tau.indices.to(device=d.device, dtype=torch.long),
                       tau.values.to(device=d.device, dtype=torch.float32), alpha=alpha)
        return out.view(delta.shape).to(out_dtype)
    if keep_rate < 1:
        d = d * topk_mask(d, keep_rate)
    if not sparse:
        return _elect(tau.to(device=d.device, dtype=torch.float32), d, alpha).to(out_dtype)
    # Where tau is 0 the elected sign is delta's own, so delta is kept whole: elect on tau's entries only.
    out = d.mul(1 - alpha).reshape(-1)
    idx = tau.indices.to(device=d.device, dtype=torch.long)
    out[idx] = _elect(tau.values.to(device=d.device, dtype=torch.float32), d.reshape(-1)[idx], alpha)
    return out.view(delta.shape).to(out_dtype)


def _elect(t: "torch.Tensor", d: "torch.Tensor", alpha: float) -> "torch.Tensor":
    """TIES sign election: ``alpha*t*[t agrees] + (1-alpha)*d*[d agrees]`` with the sign of ``t + d``."""
    s = (t + d).sign_()
    # x agrees with s exactly when x*s > 0 (a zero term contributes nothing either way)
    out = (t * s).gt_(0).mul_(t).mul_(alpha)
    return out.addcmul_((d * s).gt_(0), d, value=1 - alpha)


# ---------------------------------------------------------------- sparse tau

@dataclass
class SparseTau:
    """A flat sparse vector of ``numel`` entries: ``values`` at ``indices`` (dense when ``indices`` is None)."""

    numel: int
    indices: "torch.Tensor | None"
    values: "torch.Tensor"

    def nbytes(self) -> int:
        """Bytes held (indices + values)."""
        n = self.values.numel() * self.values.element_size()
        if self.indices is not None:
            n += self.indices.numel() * self.indices.element_size()
        return n

    def dense(self, device=None) -> "torch.Tensor":
        """The flat fp32 dense vector (a temporary the size of the slice)."""
        import torch

        if self.indices is None:
            return self.values.to(device=device, dtype=torch.float32)
        out = torch.zeros(self.numel, dtype=torch.float32, device=device)
        out[self.indices.to(device=device, dtype=torch.long)] = self.values.to(device=device, dtype=torch.float32)
        return out

    def slice(self, start: int, length: int) -> "SparseTau":
        """Entries in ``[start, start+length)``, re-indexed from 0 (a rank's slice of a parameter)."""
        if start == 0 and length == self.numel:
            return self
        if self.indices is None:
            return SparseTau(length, None, self.values[start:start + length].clone())
        sel = (self.indices >= start) & (self.indices < start + length)
        return SparseTau(length, (self.indices[sel] - start).to(self.indices.dtype), self.values[sel].clone())


def sparsify(tau: "torch.Tensor", method: str, keep_rate: float, generator: "torch.Generator | None" = None) -> SparseTau:
    """Sparsify a full tau once: DARE (random mask, kept values rescaled by 1/p) or TIES (top-p by magnitude)."""
    import torch

    flat = tau.detach().reshape(-1).float()
    if keep_rate >= 1:
        return SparseTau(flat.numel(), None, flat.clone())
    if method == "ondare":
        keep = dare_mask(flat, keep_rate, generator)
        vals = flat[keep] / keep_rate
    elif method == "onties":
        keep = topk_mask(flat, keep_rate)
        vals = flat[keep]
    else:
        raise ValueError(f"sparsify: method must be one of {METHODS}, got {method!r}")
    idx_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    idx = keep.nonzero().squeeze(1).to(idx_dtype)
    return SparseTau(flat.numel(), idx, vals.contiguous())


def _name_seed(seed: int, name: str) -> int:
    # Every rank must draw the same tau mask for a parameter: seed it by name, not by order or rank.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def sparsify_all(taus: Iterable[tuple[str, "torch.Tensor"]], method: str, keep_rate: float, seed: int = 0) -> dict[str, SparseTau]:
    """Sparsify each named full tau with a mask seeded by (seed, name)."""
    import torch

    out = {}
    for name, t in taus:
        g = torch.Generator(device=t.device).manual_seed(_name_seed(seed, name))
        out[name] = sparsify(t, method, keep_rate, g)
    return out


# ---------------------------------------------------------------- tau from checkpoints

def iter_checkpoint(path: str | Path) -> Iterator[tuple[str, "torch.Tensor"]]:
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

    base_index = _tensor_index(base)
    ref_index = _tensor_index(reference)
    name_of = _match_names(param_names, ref_index)
    missing = [n for n in param_names if n not in name_of.values()]
    if missing:
        raise ValueError(f"merging: reference {reference} has no tensor for parameter(s) {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}")
    out: dict[str, SparseTau] = {}
    for key, pname in name_of.items():
        if key not in base_index:
            raise ValueError(f"merging: base model {base} has no tensor {key!r} (is it the same architecture?)")
        r, b = _load_one(ref_index[key], key), _load_one(base_index[key], key)
        if r.shape != b.shape:
            raise ValueError(f"merging: {key}: reference shape {tuple(r.shape)} != base shape {tuple(b.shape)}")
        t = r.float() - b.float()
        g = torch.Generator().manual_seed(_name_seed(seed, pname))
        out[pname] = sparsify(t, method, keep_rate, g)
    return out


def _tensor_index(path: str | Path) -> dict[str, Path]:
    """tensor key -> file holding it (reads only safetensors headers)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"merging: checkpoint folder not found: {path}")
    idx = {}
    files = sorted(p.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                idx.update({k: f for k in fh.keys()})
        return idx
    for k, _ in iter_checkpoint(p):
        idx[k] = p
    return idx


def _load_one(f: Path, key: str) -> "torch.Tensor":
    if f.is_dir():
        return dict(iter_checkpoint(f))[key]
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as fh:
        return fh.get_tensor(key)


# ---------------------------------------------------------------- the optimizer wrapper

@dataclass
class _Frag:
    name: str
    storage_ptr: int
    storage_offset: int  # element offset of the slice in its storage
    numel: int
    param_start: int  # where the slice starts in the flattened parameter


class _MergingMixin:
    """Wraps ``inner`` (any torch optimizer); after each inner step, replaces every update by ``merged_update``.

    ``tau_source``: ``{name: SparseTau}`` (already sparsified), ``{name: Tensor}``
    (full tau, sparsified here), or ``(reference_path, base_path)``. Names are
    those of ``named_params``. Parameters without a tau entry merge with tau = 0.
    """

    def __init__(self, inner, named_params: Iterable[tuple[str, "torch.nn.Parameter"]], tau_source: Any, *,
                 method: str = "ondare", keep_rate: float = 1e-2, alpha: float = 3e-7, seed: int = 0,
                 chunk_numel: int = 1 << 27):
        import torch

        if method not in METHODS:
            raise ValueError(f"merging: method must be one of {METHODS}, got {method!r}")
        self.inner = inner
        self.named_params = [(n, p) for n, p in named_params if p.requires_grad]
        self.method, self.keep_rate, self.alpha, self.seed = method, keep_rate, alpha, seed
        self.chunk_numel = chunk_numel
        names = [n for n, _ in self.named_params]
        if isinstance(tau_source, tuple):
            self.taus = tau_from_checkpoints(tau_source[0], tau_source[1], names, method, keep_rate, seed)
        elif isinstance(tau_source, dict):
            dense = [(n, t) for n, t in tau_source.items() if not isinstance(t, SparseTau)]
            self.taus = {n: t for n, t in tau_source.items() if isinstance(t, SparseTau)}
            self.taus.update(sparsify_all(dense, method, keep_rate, seed))
        else:
            raise TypeError("merging: tau_source must be a dict {name: tensor|SparseTau} or (reference, base) paths")
        unknown = set(self.taus) - set(names)
        if unknown:
            raise ValueError(f"merging: tau has entries for no trainable parameter: {sorted(unknown)[:3]}")
        self._gens: dict[str, torch.Generator] = {}
        self._frag_cache: dict[int, list[tuple[_Frag, SparseTau | None]]] = {}
        self.steps = 0
        # torch.optim.Optimizer API pieces that LR schedulers, accelerate and trainers touch.
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()

    # -- delegation: schedulers, accelerate and DeepSpeed read and *write* these on the inner optimizer
    @property
    def param_groups(self):
        """The inner optimizer's param groups (shared, not copied)."""
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.inner.param_groups = value

    @property
    def state(self):
        """The inner optimizer's state."""
        return self.inner.state

    @state.setter
    def state(self, value):
        self.inner.state = value

    @property
    def defaults(self):
        """The inner optimizer's defaults."""
        return self.inner.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Delegate to the inner optimizer."""
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The inner optimizer's state plus the step count (tau is rebuilt from the seed, not saved)."""
        return {"inner": self.inner.state_dict(), "merging_steps": self.steps}

    def load_state_dict(self, sd: dict) -> None:
        """Inverse of ``state_dict`` (also accepts a bare inner state dict)."""
        if "inner" in sd and "merging_steps" in sd:
            self.inner.load_state_dict(sd["inner"])
            self.steps = int(sd["merging_steps"])
        else:
            self.inner.load_state_dict(sd)

    def add_param_group(self, group: dict) -> None:
        """Delegate to the inner optimizer."""
        self.inner.add_param_group(group)

    def register_step_pre_hook(self, hook: Callable) -> Any:
        """Delegate to the inner optimizer."""
        return self.inner.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable) -> Any:
        """Delegate to the inner optimizer."""
        return self.inner.register_step_post_hook(hook)

    def __getstate__(self):
        return self.__dict__

    def __repr__(self) -> str:
        return f"MergingOptimizer({self.method}, keep_rate={self.keep_rate}, alpha={self.alpha}, inner={type(self.inner).__name__})"

    def tau_nbytes(self) -> int:
        """Bytes held by the stored (sparse) tau."""
        return sum(t.nbytes() for t in self.taus.values())

    # -- mapping from the tensors the inner optimizer steps to named parameter slices
    def _candidates(self) -> list[_Frag]:
        out = []
        for name, p in self.named_params:
            hp = getattr(p, "_hp_mapping", None)
            z3 = getattr(p, "_z3_optimizer", None)
            if z3 is not None and hasattr(p, "ds_id"):  # ZeRO-3: slice of a sub-group's flat fp32 partition
                gi, off, n = z3.grad_position[z3.get_param_id(p)]
                flat = z3.fp32_partitioned_groups_flat[gi]
                part = p.ds_tensor.ds_numel
                rank = z3._get_param_partition_rank(p) if hasattr(z3, "_get_param_partition_rank") else 0
                start = part * rank
                n = max(0, min(int(n), int(p.ds_numel) - start))  # the last rank's slice carries padding
                if n:
                    out.append(_Frag(name, flat.untyped_storage().data_ptr(), flat.storage_offset() + int(off), n, start))
            elif hp is not None:  # ZeRO-1/2: fragment of the rank's flat fp32 partition
                frag = hp.hp_fragment
                out.append(_Frag(name, frag.untyped_storage().data_ptr(), frag.storage_offset(), frag.numel(),
                                 hp.lp_fragment_address.start))
            elif p.numel():
                if not p.is_contiguous():
                    raise ValueError(f"merging: parameter {name} is not contiguous")
                out.append(_Frag(name, p.untyped_storage().data_ptr(), p.storage_offset(), p.numel(), 0))
        return out

    def _fragments(self, t: "torch.Tensor") -> list[tuple[_Frag, SparseTau | None]]:
        key = id(t)
        hit = self._frag_cache.get(key)
        if hit is not None and hit[0] == t.untyped_storage().data_ptr():
            return hit[1]
        ptr, lo, hi = t.untyped_storage().data_ptr(), t.storage_offset(), t.storage_offset() + t.numel()
        frags = []
        for f in self._candidates():
            if f.storage_ptr == ptr and lo <= f.storage_offset and f.storage_offset + f.numel <= hi:
                tau = self.taus.get(f.name)
                frags.append((f, tau.slice(f.param_start, f.numel) if tau is not None else None))
        self._frag_cache[key] = (ptr, frags)
        return frags

    def _generator(self, device) -> "torch.Generator":
        import torch

        key = str(device)
        if key not in self._gens:
            rank = 0
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank = torch.distributed.get_rank()
            self._gens[key] = torch.Generator(device=device).manual_seed(self.seed * 7919 + 104729 * (rank + 1))
        return self._gens[key]

    # -- the step
    def step(self, closure: Callable | None = None):
        """Inner step chunk by chunk; then each stepped tensor's slices get ``old + merged_update(new - old)``."""
        import torch

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.inner.param_groups
        saved = [g["params"] for g in groups]
        chunks: list[list[tuple[int, Any]]] = []
        cur: list[tuple[int, Any]] = []
        size = 0
        for gi, ps in enumerate(saved):
            for p in ps:
                if p.grad is None:
                    continue
                if cur and size + p.numel() > self.chunk_numel:
                    chunks.append(cur)
                    cur, size = [], 0
                cur.append((gi, p))
                size += p.numel()
        if cur:
            chunks.append(cur)
        try:
            for chunk in chunks:
                if len(chunks) > 1:
                    for gi, g in enumerate(groups):
                        g["params"] = [p for gj, p in chunk if gj == gi]
                with torch.no_grad():
                    old = [p.detach().clone() for _, p in chunk]
                self.inner.step()
                with torch.no_grad():
                    for (_, p), o in zip(chunk, old):
                        self._merge_tensor(p, o)
                del old
        finally:
            for g, ps in zip(groups, saved):
                g["params"] = ps
        self.steps += 1
        return loss

    def _merge_tensor(self, p: "torch.Tensor", old: "torch.Tensor") -> None:
        flat, oflat = p.data.view(-1), old.view(-1)
        gen = self._generator(p.device)
        lo = p.storage_offset()
        for f, tau in self._fragments(p):
            s = f.storage_offset - lo
            cur, prev = flat[s:s + f.numel], oflat[s:s + f.numel]
            delta = cur - prev
            t = tau if tau is not None else torch_zeros_like(delta)
            cur.copy_(prev + merged_update(delta, t, method=self.method, keep_rate=self.keep_rate,
                                           alpha=self.alpha, generator=gen))


_CLASS: list = []


def optimizer_class() -> type:
    """``MergingOptimizer``: the wrapper as a ``torch.optim.Optimizer`` subclass (LR schedulers check the type).

    Built on first use so that importing this module (recipe validation) does not import torch.
    """
    if not _CLASS:
        import torch

        class MergingOptimizer(_MergingMixin, torch.optim.Optimizer):
            __doc__ = _MergingMixin.__doc__

        _CLASS.append(MergingOptimizer)
    return _CLASS[0]


def __getattr__(name: str):
    if name == "MergingOptimizer":
        return optimizer_class()
    raise AttributeError(name)


def torch_zeros_like(x):
    """``torch.zeros_like`` in fp32 (tau's dtype)."""
    import torch

    return torch.zeros(x.shape, dtype=torch.float32, device=x.device)


# ---------------------------------------------------------------- entry points for stages

def check_model(model: Any) -> None:
    """Raise a clear error for models the merge is undefined for (LoRA / adapters)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if type(model).__name__.startswith("Peft") or any("lora_" in n for n in names):
        raise ValueError("merging: the online merging optimizer needs full fine-tuning; with LoRA adapters "
                         "tau = theta_sft - theta_base is not defined on the adapter weights "
                         "(set lora: null or merging: null)")
    if not names:
        raise ValueError("merging: the model has no trainable parameters")


def resolve_paths(cfg: MergingConfig, ctx: Any, policy_path: str) -> tuple[str, str]:
    """(reference, base) folders for a stage: ``cfg`` keys, else the policy start and the recipe's ``model.base``."""
    ref = ctx.resolve(cfg.reference_model) if cfg.reference_model else policy_path
    base = cfg.base_model or getattr(getattr(ctx.recipe.file, "model", None), "base", None)
    if not base:
        raise ValueError(f"stage {ctx.spec.name}: merging needs the pre-trained base model "
                         "(set merging.base_model or model.base in the recipe)")
    return ref, ctx.resolve(base)


def wrap_optimizer(optimizer, model, cfg: MergingConfig, *, reference: str | None = None, base: str | None = None,
                   tau: dict | None = None):
    """Wrap ``optimizer`` (built on ``model``'s parameters) in a MergingOptimizer configured by ``cfg``.

    tau comes from ``tau`` ({name: tensor}) or from the ``reference`` and ``base``
    checkpoint folders (names matched to ``model.named_parameters()``).
    Use before ``deepspeed.initialize`` / ``accelerator.prepare``; in an HF/TRL
    trainer, see ``patch_trainer``.
    """
    check_model(model)
    if tau is None:
        if not (reference and base):
            raise ValueError("merging: give tau or both reference and base checkpoint folders")
        tau = (str(reference), str(base))
    opt = optimizer_class()(optimizer, model.named_parameters(), tau, method=cfg.method, keep_rate=cfg.keep_rate,
                           alpha=cfg.alpha, seed=cfg.seed, chunk_numel=cfg.chunk_numel)
    log.info("merging: %s, keep_rate %g, alpha %g, tau %.1f MiB", cfg.method, cfg.keep_rate, cfg.alpha,
             opt.tau_nbytes() / 2**20)
    return opt


def patch_trainer(trainer, cfg: MergingConfig, *, reference: str, base: str) -> None:
    """Make an HF/TRL ``trainer`` wrap the optimizer it creates (call before ``trainer.train()``)."""
    original = trainer.create_optimizer

    def create_optimizer(*a, **kw):
        opt = original(*a, **kw)
        if not isinstance(opt, _MergingMixin):
            trainer.optimizer = wrap_optimizer(opt, trainer.model, cfg, reference=reference, base=base)
        return trainer.optimizer

    trainer.create_optimizer = create_optimizer


def describe(cfg: MergingConfig | None) -> str:
    """One-line description for logs and manifests."""
    return "off" if cfg is None else json.dumps({"method": cfg.method, "keep_rate": cfg.keep_rate, "alpha": cfg.alpha})


__all__ = ["MergingConfig", "MergingOptimizer", "SparseTau", "merged_update", "sparsify", "sparsify_all",
           "tau_from_checkpoints", "wrap_optimizer", "patch_trainer", "check_model", "resolve_paths",
           "topk_mask", "dare_mask", "math"]
