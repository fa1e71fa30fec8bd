"""transformers ``generate`` backend: batched with left padding; the fallback sampler.

Input: chat prompts, rendered with the tokenizer's chat template (or the recipe's). Output:
``Completion`` lists. On tiny CPU models this is the fastest backend.

Sampling is done by a logits processor that draws each row's token with that row's own
``torch.Generator`` (seeded from the prompt's seed and the sample index), while ``generate``
runs greedily on the processed scores: batching stays, and a prompt's samples do not depend
on the other prompts of the call. The generation settings are exactly the call's
``SamplingParams`` (a fresh ``GenerationConfig``: a checkpoint's own defaults such as
``repetition_penalty`` or ``top_k`` are not applied, as with the vLLM backend); only its
end-of-sequence ids are taken from the model's generation config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from posttrain.core.devices import resolve_device, torch_dtype
from posttrain.core.sampling.base import (Completion, Messages, SamplerConfig, SamplingParams, eos_token_ids,
                                          prompt_seeds, render_prompts, trim_at_stop)


def _row_sampler(generators: list[Any], temperature: float, top_p: float) -> Any:
    """A LogitsProcessor that samples one token per row with its own generator and forces it."""
    import torch
    from transformers import LogitsProcessor

    class RowSampler(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            probs = torch.softmax(scores.float() / temperature, dim=-1)
            if top_p < 1.0:
                sp, si = probs.sort(dim=-1, descending=True)
                drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix reaching top_p
                sp = sp.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter_(-1, si, sp)
            picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
            out = torch.full_like(scores, float("-inf"))
            out[torch.arange(len(picks)), torch.cat(picks)] = 0.0
            return out

    return RowSampler()


class HFSampler:
    """Sampler on a transformers causal LM (also wraps an in-memory model for online DPO)."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any = None, cfg: SamplerConfig | None = None,
                 chat_template: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg or SamplerConfig()
        self.device = resolve_device(self.cfg.device)
        if isinstance(model, str):
            from posttrain.core.distributed import plain_loading

            with plain_loading():  # a sampler's model is never partitioned by a live ZeRO-3 trainer
                self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype(self.cfg.dtype, self.device))
            self.model.to(self.device)
        else:
            self.model = model
            self.device = str(next(model.parameters()).device)
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.eos_ids = eos_token_ids(tokenizer, getattr(self.model, "generation_config", None))
        if not self.eos_ids:
            raise ValueError("hf sampler: neither the tokenizer nor the generation config names an eos token")
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.model.eval()

    def encode(self, prompts: list[Messages]) -> list[list[int]]:
        """Render and tokenize prompts with the generation prompt appended."""
        return render_prompts(self.tokenizer, prompts, self.chat_template)

    def generate(self, prompts: list[Messages], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """Generate ``params.n`` completions per prompt, ``cfg.batch_size`` sequences per generate() call."""
        encoded = self.encode(prompts)
        pseeds = prompt_seeds(prompts, params, seeds)
        results: list[list[Completion]] = []
        bs = max(1, self.cfg.batch_size // max(1, params.n))
        for start in range(0, len(encoded), bs):
            results.extend(self._generate_batch(encoded[start:start + bs], pseeds[start:start + bs], params))
        return results

    def _generate_batch(self, batch: list[list[int]], seeds: list[int | None], params: SamplingParams
                        ) -> list[list[Completion]]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        from posttrain.core.losses import token_logprobs

        width = max(len(x) for x in batch)
        rows = [x for x in batch for _ in range(params.n)]  # row i*n + j: sample j of prompt i
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, x in enumerate(rows):
            ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        gcfg = GenerationConfig(max_new_tokens=params.max_tokens, do_sample=False,
                                pad_token_id=self.pad_id, eos_token_id=list(self.eos_ids),
                                return_dict_in_generate=True, output_logits=params.logprobs)
        kwargs: dict[str, Any] = {"generation_config": gcfg}
        if params.temperature > 0:
            gens = []
            for s in seeds:
                for j in range(params.n):
                    g = torch.Generator(device="cpu" if self.device == "cpu" else self.device)
                    if s is None:
                        g.seed()
                    else:
                        g.manual_seed((s * 1_000_003 + j) % (2**63))
                    gens.append(g)
            kwargs["logits_processor"] = LogitsProcessorList([_row_sampler(gens, params.temperature, params.top_p)])
        # generate() fills every setting left unset in gcfg from model.generation_config (a Qwen2 checkpoint's
        # repetition_penalty 1.1, top_k 20, ...); a blank one stands in for it during the call.
        own, self.model.generation_config = self.model.generation_config, GenerationConfig()
        try:
            with torch.no_grad():
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        finally:
            self.model.generation_config = own
        gen = out.sequences[:, width:].cpu()
        lps = token_logprobs(torch.stack(out.logits, dim=1).cpu(), gen) if params.logprobs else None
        eos = set(self.eos_ids)
        results: list[list[Completion]] = []
        for i in range(len(batch)):
            row = []
            for j in range(params.n):
                k = i * params.n + j
                toks, finish = gen[k].tolist(), "length"
                end = next((t for t, x in enumerate(toks) if x in eos), None)
                if end is not None:  # rows that ended early are padded to the batch width after their eos
                    toks, finish = toks[: end + 1], "stop"
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                toks, text, hit = trim_at_stop(toks, text, params.stop, self._decode)
                if hit:
                    finish = "stop"
                row.append(Completion(text=text, token_ids=toks, finish_reason=finish,
                                      logprobs=lps[k, : len(toks)].tolist() if lps is not None else None))
            results.append(row)
        return results

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update_weights(self, named_tensors: Any) -> None:
        """Copy ``(name, tensor)`` pairs (state-dict names) into the model; a tensor that already is the
        model's own storage (a sampler sharing the policy) is left alone."""
        import torch

        state = self.model.state_dict()
        with torch.no_grad():
            for name, t in named_tensors:
                if name not in state:
                    raise KeyError(f"hf sampler: the model has no weight named {name!r}")
                dst = state[name]
                if dst.data_ptr() != t.data_ptr():
                    dst.copy_(t.to(device=dst.device, dtype=dst.dtype))

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """Log-probability of each token ``token_ids[i]`` (i >= 1) given the tokens before it."""
        from posttrain.core.losses import probe_logprobs

        return probe_logprobs(self.model, token_ids, self.device)

    def close(self) -> None:
        """Drop the model reference."""
        self.model = None
