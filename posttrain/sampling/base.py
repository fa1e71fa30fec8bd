"""The Sampler protocol shared by every synthesis stage and by online DPO.

Input: a batch of chat prompts (each a list of ``{"role", "content"}`` messages)
and ``SamplingParams``. Output: for each prompt, ``n`` ``Completion`` objects
(text, generated token ids, finish reason ``"stop"``/``"length"``, and the
log-probability of each generated token when asked). All prompts of one call
go to the engine at once so it can batch.

``SamplerConfig`` is the recipe's ``sampler:`` section; ``make_sampler`` builds
the backend it names (``hf``, ``vllm``, ``openai``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Messages = list[dict]


@dataclass
class SamplingParams:
    """Per-call sampling settings (also usable as a recipe section)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] | None = None
    seed: int | None = None
    logprobs: bool = False

    def check(self) -> None:
        """Reject impossible values (called by the strict config loader)."""
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Completion:
    """One generated response."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    logprobs: list[float] | None = None

    @property
    def terminated(self) -> bool:
        """True when the model ended the response itself (not cut by max_tokens)."""
        return self.finish_reason == "stop"


@runtime_checkable
class Sampler(Protocol):
    """Anything that turns chat prompts into completions."""

    name: str

    def generate(self, prompts: list[Messages], params: SamplingParams) -> list[list[Completion]]:
        """Return ``params.n`` completions for each prompt, in prompt order."""
        ...

    def close(self) -> None:
        """Release the engine / connections."""
        ...


@dataclass
class SamplerConfig:
    """The recipe's ``sampler:`` section (a stage may carry its own)."""

    backend: Literal["hf", "vllm", "openai"] = "hf"
    model: str | None = None  # default: the recipe's model.path (or the stage's policy)
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # hf
    batch_size: int = 64
    device: str = "auto"
    # vllm
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    enforce_eager: bool = True
    enable_sleep_mode: bool = False
    cpu_kv_cache_gb: int = 1
    # openai-compatible server
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    served_model_name: str | None = None
    max_concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 120.0
    request_token_ids: bool = True  # vLLM servers return generated token ids; false for hosted APIs
    extra_body: dict[str, object] = field(default_factory=dict)  # merged into every request

    def check(self) -> None:
        """Cross-field checks."""
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.max_concurrency < 1 or self.batch_size < 1:
            raise ValueError("max_concurrency and batch_size must be >= 1")


def make_sampler(cfg: SamplerConfig, model: str | None = None, tokenizer: str | None = None) -> Sampler:
    """Build the backend named by ``cfg.backend``; ``model`` fills in ``cfg.model`` when unset."""
    model = cfg.model or model
    tokenizer = cfg.tokenizer or tokenizer or model
    if cfg.backend == "hf":
        from posttrain.sampling.hf import HFSampler

        if not model:
            raise ValueError("sampler: no model given (set sampler.model or model.path)")
        return HFSampler(model, tokenizer, cfg)
    if cfg.backend == "vllm":
        from posttrain.sampling.vllm_backend import VLLMSampler

        if not model:
            raise ValueError("sampler: no model given (set sampler.model or model.path)")
        return VLLMSampler(model, tokenizer, cfg)
    from posttrain.sampling.openai_backend import OpenAISampler

    return OpenAISampler(cfg, model=model)
