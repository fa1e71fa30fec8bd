"""transformers ``generate`` backend: batched with left padding; the fallback sampler.

Input: chat prompts, rendered with the tokenizer's chat template. Output:
``Completion`` lists. On tiny CPU models this is the fastest backend.
"""

from __future__ import annotations

from posttrain.sampling.base import Completion, Messages, SamplerConfig, SamplingParams


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(name: str, device: str):
    """Map a recipe dtype name to a torch dtype ('auto': bf16 on GPU, fp32 on CPU)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


class HFSampler:
    """Sampler on a transformers causal LM (also wraps an in-memory model for online DPO)."""

    name = "hf"

    def __init__(self, model, tokenizer=None, cfg: SamplerConfig | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg or SamplerConfig()
        self.device = resolve_device(self.cfg.device)
        if isinstance(model, str):
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype(self.cfg.dtype, self.device))
            self.model.to(self.device)
        else:
            self.model = model
            self.device = str(next(model.parameters()).device)
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.tokenizer = tokenizer
        self.model.eval()

    def encode(self, prompts: list[Messages]) -> list[list[int]]:
        """Render and tokenize prompts with the generation prompt appended."""
        out = []
        for p in prompts:
            ids = self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
            out.append(list(ids["input_ids"]))
        return out

    def generate(self, prompts: list[Messages], params: SamplingParams) -> list[list[Completion]]:
        """Generate ``params.n`` completions per prompt, ``cfg.batch_size`` prompts per forward batch."""
        import torch

        encoded = self.encode(prompts)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        results: list[list[Completion]] = []
        bs = max(1, self.cfg.batch_size // max(1, params.n)) if params.n > 1 else self.cfg.batch_size
        for start in range(0, len(encoded), bs):
            results.extend(self._generate_batch(encoded[start:start + bs], params))
        return results

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        import torch

        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        greedy = params.temperature == 0
        kwargs = dict(max_new_tokens=params.max_tokens, do_sample=not greedy, num_return_sequences=params.n,
                      pad_token_id=pad, eos_token_id=eos, return_dict_in_generate=True,
                      output_logits=params.logprobs, top_k=None)
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs.update(temperature=None, top_p=None)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        gen = out.sequences[:, width:].cpu()
        lps = None
        if params.logprobs:
            logits = torch.stack(out.logits, dim=1).float().cpu()
            lps = torch.log_softmax(logits, -1).gather(-1, gen.unsqueeze(-1)).squeeze(-1)
        results: list[list[Completion]] = []
        for i in range(len(batch)):
            row = []
            for j in range(params.n):
                k = i * params.n + j
                toks = gen[k].tolist()
                finish = "length"
                if pad != eos and pad in toks:  # rows that stopped early are padded to the batch width
                    toks = toks[: toks.index(pad)]
                if eos in toks:
                    toks = toks[: toks.index(eos) + 1]
                    finish = "stop"
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                if params.stop:
                    hits = [text.find(s) for s in params.stop if s in text]
                    if hits:
                        text = text[: min(hits)]
                        finish = "stop"
                    elif finish == "length" and len(toks) < params.max_tokens:
                        finish = "stop"  # generate stopped early on a stop string
                row.append(Completion(text=text, token_ids=toks, finish_reason=finish,
                                      logprobs=lps[k, : len(toks)].tolist() if lps is not None else None))
            results.append(row)
        return results

    def update_weights(self, named_tensors) -> None:
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
        import torch

        ids = torch.tensor([token_ids], device=self.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()

    def close(self) -> None:
        """Drop the model reference."""
        self.model = None
