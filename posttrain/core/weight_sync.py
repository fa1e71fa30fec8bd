"""Keeping a sampler's weights equal to the policy's during online training, and proving it.

Input: a policy (transformers model, LoRA or not; whole, or partitioned by DeepSpeed ZeRO-3) and a
sampler with ``update_weights`` / ``probe_logprobs`` (hf copy or vLLM engine). Output: the weights
pushed (``push_weights``, in chunks of whole decoder layers, so no second full copy of the model is
built; under ZeRO-3 each chunk is gathered on every rank, pushed, and released before the next), and
``verify_sync``'s measured max log-prob difference on a probe sequence — above tolerance it raises
``SyncError``, because a silently skipped sync makes the run sample from a stale policy. With several
ranks, ``probe_diff`` measures each rank's engine and ``check_sync`` raises on every rank together.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from typing import Any


class SyncError(RuntimeError):
    """The sampler does not hold the policy's weights after a sync."""


def export_weights(model) -> list[tuple[str, Any]]:
    """The policy's weights under the base model's state-dict names (LoRA merged in, adapters dropped)."""
    if not hasattr(model, "merge_adapter"):
        return list(model.state_dict().items())
    model.merge_adapter()
    try:
        out = []
        for name, t in model.state_dict().items():
            if "lora_" in name or "modules_to_save" in name:
                continue
            out.append((_base_name(name), t.detach().clone()))
        return out
    finally:
        model.unmerge_adapter()


def _base_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


def probe_diff(sampler, model, probe_ids: list[int], device: str) -> float:
    """Max |sampler - policy| log-prob over the probe sequence (``inf`` when either side is not finite).

    Under ZeRO-3 the policy's forward gathers its layers itself (call it on every rank).
    """
    import torch

    from posttrain.core.losses import probe_logprobs

    mine = torch.tensor(probe_logprobs(model, probe_ids, device), dtype=torch.float32)
    theirs = torch.tensor(sampler.probe_logprobs(probe_ids), dtype=torch.float32)
    diff = float((mine - theirs).abs().max())
    return diff if math.isfinite(diff) else math.inf


def check_sync(diff: float, tol: float, where: str, sampler_name: str) -> None:
    """Raise ``SyncError`` when a measured probe difference is above ``tol`` (or not finite)."""
    if not math.isfinite(diff) or diff > tol:
        raise SyncError(f"{where}: the {sampler_name} sampler's log-probs of the probe sequence differ from the "
                        f"policy's by {diff:.3g} (tolerance {tol:g}): its weights are not the policy's "
                        "(weight sync skipped or failed); stopping")


def verify_sync(sampler, model, probe_ids: list[int], tol: float, where: str, device: str) -> float:
    """Max |sampler - policy| log-prob over the probe; raise SyncError above ``tol``."""
    diff = probe_diff(sampler, model, probe_ids, device)
    check_sync(diff, tol, where, sampler.name)
    return diff


def set_asleep(sampler, asleep: bool) -> None:
    """Sleep / wake a colocated vLLM engine started with ``enable_sleep_mode`` on a GPU (no-op otherwise).

    Level 1 offloads the engine's weights to CPU and drops its KV cache while the policy trains;
    waking restores them, and the weight push that follows overwrites them with the new policy.
    vLLM's CPU workers cannot sleep (and ``VLLMSampler`` does not pass ``enable_sleep_mode`` there),
    so on CPUs the engine stays resident during the update.
    """
    import torch

    llm = getattr(sampler, "llm", None)
    if llm is None or not getattr(getattr(sampler, "cfg", None), "enable_sleep_mode", False) or not torch.cuda.is_available():
        return
    if getattr(sampler, "_posttrain_asleep", False) != asleep:
        llm.sleep(level=1) if asleep else llm.wake_up()
        sampler._posttrain_asleep = asleep


DEFAULT_CHUNK_BYTES = 1 << 30
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def _group_of(name: str) -> str:
    """The unit a weight is pushed with: its decoder layer (``model.layers.3``), else its module."""
    m = _LAYER.match(name)
    return m.group(1) if m else name.rpartition(".")[0]


def _nbytes(t: Any) -> int:
    return int(getattr(t, "ds_numel", None) or t.numel()) * t.element_size()  # ZeRO-3: the whole size


def _named_tensors(model) -> list[tuple[str, Any]]:
    """Every state-dict entry as ``(name, parameter or buffer)``, tied weights under each of their names."""
    out = list(model.named_parameters(remove_duplicate=False))
    for mod_name, mod in model.named_modules():
        for b_name, b in mod._buffers.items():
            if b is not None and b_name not in mod._non_persistent_buffers_set:
                out.append((f"{mod_name}.{b_name}" if mod_name else b_name, b))
    return out


def weight_chunks(named: list[tuple[str, Any]], max_bytes: int) -> list[list[tuple[str, Any]]]:
    """Split ``(name, tensor)`` pairs into chunks of whole groups (a decoder layer, or another module's weights)
    of at most ``max_bytes`` (a group larger than that is a chunk of its own), keeping the order.

    vLLM fuses a layer's projections (q/k/v, gate/up) into one tensor that must be reloaded whole, which is
    why a decoder layer is never split.
    """
    groups: dict[str, list[tuple[str, Any]]] = {}
    for name, t in named:
        groups.setdefault(_group_of(name), []).append((name, t))
    chunks: list[list[tuple[str, Any]]] = []
    size = 0
    for members in groups.values():
        g = sum(_nbytes(t) for _, t in members)
        if chunks and size + g <= max_bytes:
            chunks[-1].extend(members)
            size += g
        else:
            chunks.append(list(members))
            size = g
    return chunks


def _gather_all(gathered: Callable[[Any], Any] | None, model, names: list[str]) -> Any:
    """One context in which the modules holding ``names`` are whole (every rank must enter it under ZeRO-3).

    The modules go in one container, so a weight two of them share (tied embeddings) is gathered once.
    """
    if gathered is None:
        return contextlib.nullcontext()
    import torch

    mods = [model.get_submodule(p) for p in dict.fromkeys(_group_of(n) for n in names)]
    return gathered(torch.nn.ModuleList(mods))


def iter_weight_chunks(policy, max_bytes: int = DEFAULT_CHUNK_BYTES,
                       gathered: Callable[[Any], Any] | None = None) -> Iterator[list[tuple[str, Any]]]:
    """Yield the policy's weights (base-model state-dict names) chunk by chunk; each chunk's tensors are whole
    only until the next one is asked for.

    ``gathered(module)``: a context in which ``module``'s parameters are whole (``Dist.gathered``; ZeRO-3
    gathers its shards, so every rank must iterate to the end). A LoRA policy is merged for the whole
    iteration (under ZeRO-3 the whole model is gathered for that: merging needs every weight).
    """
    if hasattr(policy, "merge_adapter"):
        with gathered(policy) if gathered is not None else contextlib.nullcontext():
            policy.merge_adapter()
            try:
                named = [(_base_name(n), t) for n, t in policy.state_dict().items()
                         if "lora_" not in n and "modules_to_save" not in n]
                for chunk in weight_chunks(named, max_bytes):
                    yield [(n, t.detach()) for n, t in chunk]
            finally:
                policy.unmerge_adapter()
        return
    for chunk in weight_chunks(_named_tensors(policy), max_bytes):
        with _gather_all(gathered, policy, [n for n, _ in chunk]):
            yield [(n, t.detach()) for n, t in chunk]


def push_weights(sampler, policy, max_bytes: int = DEFAULT_CHUNK_BYTES,
                 gathered: Callable[[Any], Any] | None = None) -> int:
    """Send the policy's current weights to the sampler chunk by chunk; return the number of chunks.

    Tests replace this to simulate a skipped sync. Every rank of a ZeRO-3 run must call it (see
    ``iter_weight_chunks``), each pushing into its own engine.
    """
    n = 0
    for chunk in iter_weight_chunks(policy, max_bytes, gathered):
        sampler.update_weights(chunk)
        n += 1
    finish = getattr(sampler, "finish_weights", None)
    if finish is not None:  # a server sampler loads the chunks it was sent only now
        finish()
    return n
