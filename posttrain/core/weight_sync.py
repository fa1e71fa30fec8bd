"""Keeping a sampler's weights equal to the policy's during online training, and proving it.

Input: a policy (transformers model, LoRA or not) and a sampler with ``update_weights`` /
``probe_logprobs`` (hf copy or vLLM engine). Output: the weights pushed, and ``verify_sync``'s
measured max log-prob difference on a probe sequence — above tolerance it raises ``SyncError``,
because a silently skipped sync makes the run sample from a stale policy.
"""

from __future__ import annotations

import math
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
            out.append((name.removeprefix("base_model.model.").replace(".base_layer", ""), t.detach().clone()))
        return out
    finally:
        model.unmerge_adapter()


def verify_sync(sampler, model, probe_ids: list[int], tol: float, where: str, device: str) -> float:
    """Max |sampler - policy| log-prob over the probe; raise SyncError above ``tol``."""
    import torch

    from posttrain.core.losses import probe_logprobs

    mine = torch.tensor(probe_logprobs(model, probe_ids, device), dtype=torch.float32)
    theirs = torch.tensor(sampler.probe_logprobs(probe_ids), dtype=torch.float32)
    diff = float((mine - theirs).abs().max())
    if not math.isfinite(diff) or diff > tol:
        raise SyncError(f"{where}: the {sampler.name} sampler's log-probs of the probe sequence differ from the "
                        f"policy's by {diff:.3g} (tolerance {tol:g}): its weights are not the policy's "
                        "(weight sync skipped or failed); stopping")
    return diff


def set_asleep(sampler, asleep: bool) -> None:
    """Sleep / wake a colocated vLLM engine started with ``enable_sleep_mode`` on a GPU (no-op otherwise).

    Level 1 offloads the engine's weights to CPU and drops its KV cache while the policy trains;
    waking restores them, and the weight push that follows overwrites them with the new policy.
    """
    import torch

    llm = getattr(sampler, "llm", None)
    if llm is None or not getattr(getattr(sampler, "cfg", None), "enable_sleep_mode", False) or not torch.cuda.is_available():
        return
    if getattr(sampler, "_posttrain_asleep", False) != asleep:
        llm.sleep(level=1) if asleep else llm.wake_up()
        sampler._posttrain_asleep = asleep


def push_weights(sampler, policy) -> None:
    """Send the policy's current weights to the sampler (tests replace this to simulate a skipped sync)."""
    sampler.update_weights(export_weights(policy))
