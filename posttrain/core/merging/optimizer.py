"""The optimizer wrapper of the online merging optimizer, for plain torch, HF/TRL trainers and DeepSpeed ZeRO.

Input: an inner torch optimizer (AdamW by default), the model's named parameters, and tau
(``posttrain.core.merging.sparse``). Output: ``MergingOptimizer``, a drop-in optimizer whose
step replaces each parameter's update ``Delta`` (what the inner optimizer just did) by
``merged_update(Delta, tau)``; ``wrap_optimizer`` / ``patch_trainer`` for the stages.

Weight decay follows the reference implementation (QwenLM/online_merging_optimizers,
``ODAdamW.step`` / ``OTAdamW.step``): the inner optimizer steps with its decoupled weight decay
switched off, so Delta is the bare Adam update, and after the merge every weight of a group is
decayed, ``theta = (theta_old + merged) * (1 - lr * weight_decay)`` with the group's lr and
weight_decay (a group with weight_decay 0, e.g. HF's biases and norms, is not decayed). Folding
the decay into Delta instead would sparsify it with Delta: at keep rate 1e-2 about 1% of the
weights would be decayed 100x and the rest not at all. Optimizers whose weight decay is a coupled
L2 term in the gradient (SGD, Adam without decoupling, ...) keep it: it is part of their gradient,
hence of Delta. An optimizer whose kind of decay is unknown is refused when it decays.

DeepSpeed ZeRO-1/2/3: the engine hands the inner optimizer flat fp32 partitions instead of
named parameters. At its first step the wrapper finds where each named parameter's local
slice lies in those flat tensors (ZeRO-1/2: the parameter's ``_hp_mapping`` fragment; ZeRO-3:
the optimizer's ``grad_position`` and the rank's partition) and merges slice by slice inside
the engine's step, before DeepSpeed copies fp32 masters to the model weights. The snapshot
needed to measure Delta is taken one chunk of parameters at a time (``chunk_numel``).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from posttrain.core.errors import ConfigError
from posttrain.core.merging.rules import METHODS, merged_update
from posttrain.core.merging.sparse import SparseTau, sparsify_all, tau_from_checkpoints

if TYPE_CHECKING:
    import torch

    from posttrain.core.merging import MergingConfig

log = logging.getLogger("posttrain")

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

    def __init__(self, inner, named_params: Iterable[tuple[str, torch.nn.Parameter]], tau_source: Any, *,
                 method: str = "ondare", keep_rate: float = 1e-2, alpha: float = 3e-7, seed: int = 0,
                 chunk_numel: int = 1 << 27):

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
        for group in inner.param_groups:
            _decay_kind(inner, group)  # refuse an optimizer whose kind of weight decay is unknown, now
        self._gens: dict[str, torch.Generator] = {}
        self._pending_rng: dict[str, Any] = {}  # generator states restored by load_extra_state
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
        """The inner optimizer's state plus the wrapper's own (``extra_state``; tau is rebuilt, not saved).

        Under DeepSpeed ZeRO the engine calls ``step`` once per param group (ZeRO-3: sub-group).
        """
        return {"inner": self.inner.state_dict(), **self.extra_state()}

    def load_state_dict(self, sd: dict) -> None:
        """Inverse of ``state_dict`` (also accepts a bare inner state dict)."""
        if "inner" in sd and "merging_steps" in sd:
            self.inner.load_state_dict(sd["inner"])
            self.load_extra_state(sd)
        else:
            self.inner.load_state_dict(sd)

    def extra_state(self) -> dict:
        """What the wrapper itself carries across a resume: its step count and the state of the generators
        that draw OnDARE's masks (without them a resumed run would draw the first episode's masks again).
        DeepSpeed's checkpoints hold only the inner optimizer's state, so a multi-rank loop saves this per rank."""
        rng = {k: g.get_state() for k, g in self._gens.items()}
        rng.update({k: v for k, v in self._pending_rng.items() if k not in rng})
        return {"merging_steps": self.steps, "merging_rng": rng}

    def load_extra_state(self, sd: dict) -> None:
        """Inverse of ``extra_state``; a generator's state is applied when that device's generator is made."""
        self.steps = int(sd["merging_steps"])
        self._gens.clear()
        self._pending_rng = dict(sd.get("merging_rng", {}))

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

    def _fragments(self, t: torch.Tensor) -> list[tuple[_Frag, SparseTau | None]]:
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

    def _generator(self, device) -> torch.Generator:
        import torch

        key = str(device)
        if key not in self._gens:
            rank = 0
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank = torch.distributed.get_rank()
            self._gens[key] = torch.Generator(device=device).manual_seed(self.seed * 7919 + 104729 * (rank + 1))
            if key in self._pending_rng:
                self._gens[key].set_state(self._pending_rng.pop(key))
        return self._gens[key]

    # -- the step
    def step(self, closure: Callable | None = None):
        """Inner step chunk by chunk; then each stepped tensor's slices get ``old + merged_update(new - old)``.

        The inner step runs with decoupled weight decay off; each group's decay is applied after
        the merge, to every weight of the stepped tensors: ``(old + merged) * (1 - lr * wd)``.
        """
        import torch

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.inner.param_groups
        saved = [g["params"] for g in groups]
        # Read before the inner step: lr is the value the inner optimizer uses at this step.
        shrink = [_shrink_factor(self.inner, g) for g in groups]
        saved_wd = [g.get("weight_decay") for g in groups]
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
            for g, f in zip(groups, shrink):
                if f is not None:
                    g["weight_decay"] = 0.0
            for chunk in chunks:
                if len(chunks) > 1:
                    for gi, g in enumerate(groups):
                        g["params"] = [p for gj, p in chunk if gj == gi]
                with torch.no_grad():
                    old = [p.detach().clone() for _, p in chunk]
                self.inner.step()
                with torch.no_grad():
                    for (gi, p), o in zip(chunk, old):
                        self._merge_tensor(p, o, shrink[gi])
                del old
        finally:
            for g, ps, f, wd in zip(groups, saved, shrink, saved_wd):
                g["params"] = ps
                if f is not None:
                    g["weight_decay"] = wd
        self.steps += 1
        return loss

    def _merge_tensor(self, p: torch.Tensor, old: torch.Tensor, shrink: float | None) -> None:
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
        if shrink is not None:
            # Decoupled decay of every weight after the merge (all of the tensor: a ZeRO flat
            # partition belongs to one param group; its padding is 0 and stays 0).
            flat.mul_(shrink)


def _decay_kind(inner: Any, group: dict) -> str:
    """``"none"``, ``"decoupled"`` (AdamW form, taken over by the wrapper) or ``"coupled"`` (L2 in the gradient).

    Raises ConfigError for an optimizer that decays in a way this wrapper cannot tell.
    """
    import torch

    wd = group.get("weight_decay", 0.0)
    if not wd:
        return "none"
    if isinstance(inner, torch.optim.AdamW) or group.get("decoupled_weight_decay") is True:
        return "decoupled"  # torch AdamW; Adam/NAdam/RAdam(decoupled_weight_decay=True)
    mode = getattr(inner, "adam_w_mode", None)  # DeepSpeed FusedAdam / DeepSpeedCPUAdam
    if mode is not None:
        return "decoupled" if bool(mode) else "coupled"
    coupled = (torch.optim.SGD, torch.optim.Adam, torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.Adamax,
               torch.optim.NAdam, torch.optim.RAdam, torch.optim.ASGD)
    if isinstance(inner, coupled):
        return "coupled"
    raise ConfigError(f"merging: cannot tell how {type(inner).__name__} applies weight_decay (the merge needs "
                      "a decoupled AdamW-style decay it can apply after the merged update, or an L2 term in the "
                      "gradient); use an AdamW optimizer (optim: adamw_torch) or weight_decay: 0")


def _shrink_factor(inner: Any, group: dict) -> float | None:
    """``1 - lr * weight_decay`` for a group whose decoupled decay the wrapper applies, else None."""
    if _decay_kind(inner, group) != "decoupled":
        return None
    return 1.0 - float(group["lr"]) * float(group["weight_decay"])


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
    """(reference, base) folders for a stage: ``cfg`` keys, else the policy start and the recipe's ``model.base``.

    Either may be a hub id; it is resolved through the Hugging Face cache like every model key.
    """
    ref = ctx.resolve_model(cfg.reference_model, "merging_reference") if cfg.reference_model else policy_path
    base = cfg.base_model or getattr(getattr(ctx.recipe.file, "model", None), "base", None)
    if not base:
        raise ValueError(f"stage {ctx.spec.name}: merging needs the pre-trained base model "
                         "(set merging.base_model or model.base in the recipe)")
    return ref, ctx.resolve_model(base, "merging_base")


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


