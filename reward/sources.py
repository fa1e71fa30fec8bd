"""Reward sources for online DPO: a reward model, the math answer checker, and user functions.

Input: the stage's reward keys (a reward-model folder and its weight, ``{"math" |
"package.module:function": weight}``). Output: ``(name, weight, fn)`` triples where
``fn(prompts, responses, records) -> list[float]`` (``reward_sources``), and their weighted
sum with a penalty for responses cut by ``max_tokens`` (``total_rewards``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from posttrain.core.errors import ConfigError

RewardFn = Callable[[list, list[str], list[dict]], list[float]]


def reference_of(rec: dict) -> Any:
    """A record's math reference: ``answer``, ``reference`` or ``meta.answer`` (None when absent)."""
    return rec.get("answer", rec.get("reference", (rec.get("meta") or {}).get("answer")))


def math_reward(prompts: list, responses: list[str], records: list[dict]) -> list[float]:
    """1.0 when the response's final answer equals the record's reference, else 0.0."""
    from reward.answers import is_correct

    out = []
    for rec, text in zip(records, responses):
        ref = reference_of(rec)
        out.append(float(ref is not None and is_correct(text, ref)))
    return out


def reward_sources(reward_model: str | None, reward_model_weight: float, functions: dict[str, float], *,
                   device: str = "auto", batch_size: int = 16, max_length: int = 2048,
                   where: str = "reward_functions") -> list[tuple[str, float, RewardFn]]:
    """(name, weight, fn) for the reward model (a loaded ``RewardScorer``) and every named function."""
    out: list[tuple[str, float, RewardFn]] = []
    if reward_model:
        from reward.scorer import RewardScorer

        scorer = RewardScorer(reward_model, device=device, batch_size=batch_size, max_length=max_length)
        out.append(("reward_model", reward_model_weight, lambda p, r, recs: scorer.score(p, r)))
    for name, w in functions.items():
        if name == "math":
            out.append(("math", w, math_reward))
            continue
        mod, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"{where}.{name}: cannot import ({e}); expected 'math' or 'package.module:function'") from None
        out.append((name, w, fn))
    return out


def total_rewards(sources: list, prompts: list, texts: list[str], records: list[dict], terminated: list[bool],
                  penalty: float) -> tuple[list[float], dict[str, float]]:
    """Weighted sum of every source's rewards, minus ``penalty`` for unterminated responses.

    Returns the totals and each source's unweighted mean (to see which reward moved).
    """
    total = [0.0] * len(texts)
    means = {}
    for name, w, fn in sources:
        vals = [float(v) for v in fn(prompts, texts, records)]
        if len(vals) != len(texts):
            raise ValueError(f"reward source {name} returned {len(vals)} values for {len(texts)} responses")
        total = [t + w * v for t, v in zip(total, vals)]
        means[name] = sum(vals) / max(1, len(vals))
    return [t - (0.0 if ok else penalty) for t, ok in zip(total, terminated)], means
