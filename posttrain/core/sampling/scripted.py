"""A scripted sampler: completions come from a function or a fixed list.

For unit tests of stage logic (known outputs, including malformed ones) and
for plugging arbitrary Python generation into a recipe run
(``Recipe.run(sampler=ScriptedSampler(...))``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from posttrain.core.sampling.base import Completion, Messages, SamplingParams


class ScriptedSampler:
    """``fn(prompt_messages, index_within_n) -> str`` produces each completion's text."""

    name = "scripted"

    def __init__(self, fn: Callable[[Messages, int], str]):
        self.fn = fn
        self.calls: list[list[Messages]] = []

    def generate(self, prompts: list[Messages], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """Return ``params.n`` scripted completions for each prompt (records the call)."""
        self.calls.append(prompts)
        return [[Completion(text=self.fn(p, j), token_ids=[], finish_reason="stop") for j in range(params.n)]
                for p in prompts]

    def close(self) -> None:
        """Nothing to release."""
