"""One vLLM engine shared by a block of training ranks (tensor parallel across ranks), used like a per-rank sampler.

Input: a sampler whose engine spans ``size`` consecutive ranks (``VLLMSampler(..., external_launcher=True)``:
each rank runs one tensor-parallel shard in its own process), and a function gathering a Python object
from every rank of that block. Output: ``GroupSampler``, which each rank calls with its own prompts, as it
would call an engine of its own: the block's prompts (and their seeds) are gathered, every rank of the
block submits all of them to the engine together (a tensor-parallel engine runs the same requests on all
its ranks in lockstep), and each rank gets back the completions of its own prompts. Weights, the probe,
sleep and close go to the engine unchanged: every rank of the block calls them together with the same
arguments, and each loads or computes its shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class GroupSampler:
    """See the module docstring."""

    def __init__(self, inner: Any, gather: Callable[[Any], list], index: int):
        self.inner = inner
        self.gather = gather
        self.index = index  # this rank's position in its block
        self.name = inner.name

    def generate(self, prompts: Sequence[Any], params: Any, seeds: Sequence[int] | None = None) -> list:
        """This rank's prompts' completions, generated together with the rest of the block's."""
        parts = self.gather((list(prompts), None if seeds is None else list(seeds)))
        every = [p for part in parts for p in part[0]]
        seeded = [s for part in parts for s in (part[1] or [])]
        out = self.inner.generate(every, params, seeds=seeded if len(seeded) == len(every) else None)
        start = sum(len(part[0]) for part in parts[: self.index])
        return out[start:start + len(prompts)]

    def __getattr__(self, name: str) -> Any:  # encode, update_weights, probe_logprobs, close, llm, ...
        return getattr(self.inner, name)
