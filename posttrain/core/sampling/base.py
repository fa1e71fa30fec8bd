"""The Sampler protocol shared by every synthesis stage and by online DPO.

Input: a batch of chat prompts (each a list of ``{"role", "content"}`` messages),
``SamplingParams`` and optionally one seed per prompt. Output: for each prompt, ``n``
``Completion`` objects (text, generated token ids, finish reason ``"stop"``/``"length"``, and
the log-probability of each generated token when asked). All prompts of one call go to the
engine at once so it can batch.

Contracts every backend keeps (tested on the real Qwen2 tokenizer):

* a response ends at any end-of-sequence id of the model's generation config (Qwen2:
  ``<|im_end|>`` and ``<|endoftext|>``), which is kept as its last token id and makes it
  ``"stop"``; the pad id is never a cut-off by itself;
* a stop string ends a response ``"stop"``; its text and its token ids are cut together
  (``trim_at_stop``), so what is trained is exactly what the text says;
* seeds are per prompt: ``seeds[i]`` (or, with only ``params.seed``, a hash of the seed and the
  prompt) seeds prompt i's samples, so a prompt's completions do not depend on which other
  prompts share its call (chunking, resume).

``SamplerConfig`` is the recipe's ``sampler:`` section; ``make_sampler`` builds the backend it
names (``hf``, ``vllm``, ``openai``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from posttrain.core.config import key
from posttrain.core.devices import DTYPES

Messages = list[dict]


@dataclass
class SamplingParams:
    """Per-call sampling settings (also usable as a recipe section)."""

    n: int = key(1, "completions per prompt")
    temperature: float = key(1.0, "0 = greedy")
    top_p: float = key(1.0, "nucleus sampling mass")
    max_tokens: int = key(256, "new tokens per completion")
    stop: list[str] | None = key(None, "stop strings (cut from the text and its token ids)")
    seed: int | None = key(None, "base seed; each prompt's samples are seeded from it and the prompt")
    logprobs: bool = key(False, "return the log-probability of each generated token")

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

    def generate(self, prompts: list[Messages], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """Return ``params.n`` completions for each prompt, in prompt order (``seeds``: one per prompt)."""
        ...

    def close(self) -> None:
        """Release the engine / connections."""
        ...


_BACKEND_KEYS = {
    "hf": {"batch_size", "device"},
    "vllm": {"tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enforce_eager",
             "enable_sleep_mode", "cpu_kv_cache_gb"},
    "openai": {"base_url", "api_key_env", "served_model_name", "max_concurrency", "max_retries", "timeout_s",
               "request_token_ids", "extra_body"},
}


@dataclass
class SamplerConfig:
    """The recipe's ``sampler:`` section (a stage may carry its own)."""

    backend: Literal["hf", "vllm", "openai"] = key("hf", "hf (transformers generate) | vllm (offline engine) | "
                                                   "openai (any OpenAI-compatible server)")
    model: str | None = key(None, "model folder or hub id (default: the recipe's model.path or the stage's policy)",
                            model=True)
    tokenizer: str | None = key(None, "tokenizer folder or hub id (default: the model's)", model=True)
    dtype: Literal[DTYPES] = key("auto", "auto: bfloat16 on a bf16 GPU, float32 elsewhere")
    # hf
    batch_size: int = key(64, "hf: sequences per generate() call")
    device: str = key("auto", "hf: device (auto: cuda when available)")
    # vllm
    tensor_parallel_size: int = key(1, "vllm: GPUs one engine spans")
    gpu_memory_utilization: float = key(0.85, "vllm (GPU): share of GPU memory the engine may take")
    max_model_len: int | None = key(None, "vllm: context length (null: the model's)")
    enforce_eager: bool = key(True, "vllm: no CUDA graphs / compilation (faster start, slower decode)")
    enable_sleep_mode: bool = key(False, "vllm (GPU): the engine can sleep (free memory) while a colocated "
                                  "policy trains")
    cpu_kv_cache_gb: int = key(1, "vllm (CPU wheel): KV-cache size in GiB")
    # openai-compatible server
    base_url: str | None = key(None, "openai: server URL, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = key("OPENAI_API_KEY", "openai: environment variable holding the API key")
    served_model_name: str | None = key(None, "openai: model name to put in requests (default: the model path)")
    max_concurrency: int = key(8, "openai: requests in flight")
    max_retries: int = key(5, "openai: retries of 429/5xx/timeouts, with exponential backoff")
    timeout_s: float = key(120.0, "openai: per-request timeout")
    request_token_ids: bool = key(True, "openai: ask for generated token ids (vLLM servers); false for hosted APIs")
    extra_body: dict[str, object] = key(factory=dict, doc="openai: merged into every request")

    def check(self, given: frozenset[str] = frozenset()) -> None:
        """Cross-field checks; a key of another backend is an error (it would do nothing)."""
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.max_concurrency < 1 or self.batch_size < 1:
            raise ValueError("max_concurrency and batch_size must be >= 1")
        for backend, keys in _BACKEND_KEYS.items():
            stray = sorted((given & keys) - _BACKEND_KEYS[self.backend])
            if backend != self.backend and stray:
                raise ValueError(f"{stray[0]} is a key of backend {backend!r} and has no effect with backend "
                                 f"{self.backend!r} (remove it)")


def make_sampler(cfg: SamplerConfig, model: str | None = None, tokenizer: str | None = None,
                 chat_template: str | None = None) -> Sampler:
    """Build the backend named by ``cfg.backend``; ``model`` fills in ``cfg.model`` when unset.

    ``chat_template`` (the recipe's ``tokenizer.chat_template`` text) replaces the tokenizer's
    template for rendering prompts (the openai backend sends it to the server with each request).
    """
    model = cfg.model or model
    tokenizer = cfg.tokenizer or tokenizer or model
    if cfg.backend == "hf":
        from posttrain.core.sampling.hf import HFSampler

        if not model:
            raise ValueError("sampler: no model given (set sampler.model or model.path)")
        return HFSampler(model, tokenizer, cfg, chat_template=chat_template)
    if cfg.backend == "vllm":
        from posttrain.core.sampling.vllm_backend import VLLMSampler

        if not model:
            raise ValueError("sampler: no model given (set sampler.model or model.path)")
        return VLLMSampler(model, tokenizer, cfg, chat_template=chat_template)
    from posttrain.core.sampling.openai_backend import OpenAISampler

    return OpenAISampler(cfg, model=model, chat_template=chat_template, tokenizer=tokenizer)


# ---------------------------------------------------------------- shared by the backends

def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from JSON-able parts (the same on every machine and run; fits every API's seed field)."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()
    return int(h[:8], 16) & 0x7FFFFFFF


def prompt_seeds(prompts: Sequence[Messages], params: SamplingParams, seeds: Sequence[int] | None) -> list[int | None]:
    """One seed per prompt: ``seeds`` as given, else derived from ``params.seed`` and the prompt, else None."""
    if seeds is not None:
        if len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        return [int(s) for s in seeds]
    if params.seed is None:
        return [None] * len(prompts)
    return [stable_seed(params.seed, p) for p in prompts]


def render_prompts(tokenizer: Any, prompts: Sequence[Messages], chat_template: str | None = None) -> list[list[int]]:
    """Prompt token ids through the chat template, with the generation prompt appended."""
    out = []
    for p in prompts:
        enc = tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True, return_dict=True,
                                            chat_template=chat_template)
        out.append(list(enc["input_ids"]))
    return out


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Every id that ends a response: the generation config's ``eos_token_id`` (int or list) and the tokenizer's."""
    ids: list[int] = []
    for v in (getattr(generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if x is not None and int(x) not in ids:
                ids.append(int(x))
    return ids


def trim_at_stop(token_ids: list[int], text: str, stops: Sequence[str] | None, decode: Any) -> tuple[list[int], str, bool]:
    """Cut a response at its first stop string, text and token ids together.

    Returns ``(ids, text, hit)``: without a stop string in ``text`` everything is returned as is;
    with one, ``ids`` is the longest prefix whose decoded text does not reach into the stop string
    and ``text`` is exactly that decoded prefix, so the two always agree.
    """
    hits = [text.find(s) for s in (stops or []) if s and s in text]
    if not hits:
        return token_ids, text, False
    cut = min(hits)
    lo, hi = 0, len(token_ids)  # largest k with decode(ids[:k]) within text[:cut]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(decode(token_ids[:mid])) <= cut and text[:cut].startswith(decode(token_ids[:mid])):
            lo = mid
        else:
            hi = mid - 1
    ids = list(token_ids[:lo])
    return ids, decode(ids), True


def weights_blob(named_tensors: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """``{name: contiguous CPU tensor}`` ready for safetensors: a weight that shares storage with one already
    taken (tied embeddings) is copied, since safetensors refuses shared storage."""
    blob, seen = {}, set()
    for name, t in named_tensors:
        t = t.detach().to("cpu")
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        blob[name] = t.contiguous()
    return blob
