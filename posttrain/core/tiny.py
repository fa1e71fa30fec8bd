"""Test models built locally (no network): tiny Qwen2s, Qwen2-shaped models, a tiny Qwen2-MoE.

Output folder layout written by ``make_tiny_model(out_dir, spec)``::

    OUT/            Qwen2ForCausalLM or Qwen2MoeForCausalLM (GQA, tied embeddings) + tokenizer
    OUT/reward/     the matching *ForSequenceClassification (num_labels=1, the policy's trunk) + tokenizer

``TinySpec`` picks the size (tiny widths or Qwen2-0.5B's), the tokenizer (the tiny one below, or
Qwen's real one from ``posttrain.core.qwen`` with the published Qwen2 / Qwen2.5 chat template, a
151,936-row embedding, and a generation config that stops on ``<|im_end|>`` or ``<|endoftext|>`` like
the Qwen2 instruct checkpoints) and MoE or dense.

The tiny tokenizer is a byte-level BPE trained with ``tokenizers`` on generated text
(English words, arithmetic, code), digits split one by one like Qwen2's, with
the ChatML special tokens ``<|endoftext|>`` (pad), ``<|im_start|>`` and
``<|im_end|>`` (eos) and a ChatML chat template whose assistant turns are
wrapped in ``{% generation %}`` markers (TRL's assistant-only loss needs them).
Both folders load with ``AutoTokenizer`` / ``AutoModelFor*``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.core.config import key

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = (
    "the a an of to and in is it you that he was for on are with as his they be at one have this from "
    "or had by word but what some we can out other were all there when up use your how said each she "
    "which do their time if will way about many then them write would like so these her long make thing "
    "see him two has look more day could go come did number sound no most people my over know water than "
    "call first who may down side been now find any new work part take get place made live where after "
    "back little only round man year came show every good me give our under name very through just form "
    "sentence great think say help low line differ turn cause much mean before move right boy old too same "
    "tell does set three want air well also play small end put home read hand port large spell add even land "
    "here must big high such follow act why ask men change went light kind off need house picture try us again "
    "animal point mother world near build self earth father head stand own page should country found answer "
    "school grow study still learn plant cover food sun four between state keep eye never last let thought city "
    "tree cross farm hard start might story saw far sea draw left late run while press close night real life "
    "few north open seem together next white children begin got walk example ease paper group always music "
    "those both mark often letter until mile river car feet care second book carry took science eat room friend "
    "began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl "
    "usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song "
    "measure door product black short numeral class wind question happen complete ship area half rock order "
    "fire south problem piece told knew pass since top whole king space heard best hour better true during "
    "hundred five remember step early hold west ground interest reach fast verb sing listen six table travel "
    "less morning ten simple several vowel toward war lay against pattern slow center love person money serve "
    "appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry "
    "dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood "
    "contain front teach week final gave green oh quick develop ocean warm free minute strong special mind "
    "behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object "
    "decide surface deep moon island foot system busy test record boat common gold possible plane stead dry "
    "wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant "
    "fill east paint language among apples oranges total sum plus minus times equals each costs has buys sells"
).split()


def corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Generated training text for the tokenizer: prose, arithmetic, JSON and code."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        r = i % 4
        if r == 0:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20))).capitalize() + ".")
        elif r == 1:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            op = rng.choice(["+", "-", "*"])
            v = {"+": a + b, "-": a - b, "*": a * b}[op]
            lines.append(f"Q: What is {a} {op} {b}? A: {a} {op} {b} = {v}. The answer is {v}. #### {v} \\boxed{{{v}}}")
        elif r == 2:
            lines.append('[{"tag": "%s", "explanation": "%s"}]' % (rng.choice(_WORDS), " ".join(rng.sample(_WORDS, 4))))
        else:
            lines.append(f"def evaluate(response):\n    return len(response.split()) <= {rng.randint(1, 99)}\n"
                         f"assert solve({rng.randint(0, 9)}) == {rng.randint(0, 99)}")
    return lines


def build_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """Train the byte-level BPE tokenizer and wrap it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token=None, additional_special_tokens=["<|im_start|>"],
                                   model_max_length=32768, padding_side="left", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass
class TinySpec:
    """Size and tokenizer of a test model (the defaults train at tens of ms per step on 2 cores).

    ``tokenizer: qwen2`` / ``qwen2.5`` use Qwen's real tokenizer and vocabulary (151,936 embedding
    rows); ``shape: qwen2-0.5b`` takes Qwen2-0.5B's widths (hidden 896, 14 heads, 2 KV heads,
    intermediate 4864, tied embeddings) with ``num_hidden_layers`` layers; ``moe: true`` builds a
    Qwen2-MoE (``Qwen2MoeConfig``: ``num_experts`` experts, top ``num_experts_per_tok``, a shared expert).
    """

    hidden_size: int = key(128, "hidden width (ignored with shape qwen2-0.5b)")
    intermediate_size: int = key(384, "MLP width (ignored with shape qwen2-0.5b)")
    num_hidden_layers: int = key(2, "decoder layers")
    num_attention_heads: int = key(4, "attention heads (ignored with shape qwen2-0.5b)")
    num_key_value_heads: int = key(2, "key/value heads (GQA; ignored with shape qwen2-0.5b)")
    vocab_size: int = key(1024, "BPE vocabulary of the tiny tokenizer (ignored with a Qwen tokenizer)")
    max_position_embeddings: int = key(4096, "context length")
    initializer_range: float = key(0.02, "std of the random weights")
    seed: int = key(0, "seed of the weights and the tiny tokenizer")
    tokenizer: Literal["tiny", "qwen2", "qwen2.5"] = key("tiny", "tiny (trained here) or Qwen's real tokenizer")
    shape: Literal["tiny", "qwen2-0.5b"] = key("tiny", "tiny widths, or Qwen2-0.5B's widths")
    moe: bool = key(False, "a Qwen2-MoE model (sparse MoE block in every layer, plus a shared expert)")
    num_experts: int = key(4, "moe: routed experts per layer")
    num_experts_per_tok: int = key(2, "moe: experts each token is routed to")

    def check(self, given: frozenset[str] = frozenset()) -> None:
        """Keys that the chosen shape/tokenizer ignore are errors."""
        if self.shape != "tiny" and given & {"hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_key_value_heads"}:
            raise ValueError(f"shape {self.shape} fixes the widths; remove hidden_size/intermediate_size/heads")
        if self.tokenizer != "tiny" and "vocab_size" in given:
            raise ValueError(f"tokenizer {self.tokenizer} fixes the vocabulary; remove vocab_size")
        if not self.moe and given & {"num_experts", "num_experts_per_tok"}:
            raise ValueError("num_experts / num_experts_per_tok need moe: true")
        if self.moe and self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok must be <= num_experts")


QWEN2_0_5B = {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
              "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6}


def _model_config(spec: TinySpec, vocab: int, eos: int, pad: int) -> Any:
    from transformers import Qwen2Config, Qwen2MoeConfig

    widths = dict(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                  num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                  rope_theta=10000.0)
    if spec.shape == "qwen2-0.5b":
        widths.update(QWEN2_0_5B)
    common = dict(vocab_size=vocab, num_hidden_layers=spec.num_hidden_layers,
                  max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=True,
                  initializer_range=spec.initializer_range, bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
                  use_cache=True, **widths)
    if not spec.moe:
        return Qwen2Config(**common)
    return Qwen2MoeConfig(**common, num_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
                          moe_intermediate_size=max(8, common["intermediate_size"] // 2),
                          shared_expert_intermediate_size=common["intermediate_size"], decoder_sparse_step=1,
                          norm_topk_prob=False, output_router_logits=False, router_aux_loss_coef=0.001)


def make_tiny_model(out_dir: str | Path, spec: TinySpec | None = None, reward: bool = True) -> Path:
    """Write the test causal LM (+ tokenizer) to ``out_dir`` and a reward model to ``out_dir/reward``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.tokenizer == "tiny":
        tok = build_tokenizer(spec.vocab_size, spec.seed)
        vocab = len(tok)
    else:
        from posttrain.core.qwen import VOCAB_SIZE, qwen2_tokenizer

        tok, vocab = qwen2_tokenizer(spec.tokenizer), VOCAB_SIZE
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = _model_config(spec, vocab, eos, pad)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    # Like the Qwen2 instruct checkpoints: a reply ends at <|im_end|> or <|endoftext|>.
    eos_ids = [eos] if spec.tokenizer == "tiny" else [eos, pad]
    model.generation_config = GenerationConfig(eos_token_id=eos_ids if len(eos_ids) > 1 else eos, pad_token_id=pad,
                                               do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if reward:
        torch.manual_seed(spec.seed + 1)
        rcfg = _model_config(spec, vocab, eos, pad)
        rcfg.num_labels = 1
        rm = AutoModelForSequenceClassification.from_config(rcfg).to(torch.float32)
        # Start the reward model from the policy's trunk, as reward models usually start from the SFT model.
        rm.model.load_state_dict(model.model.state_dict())
        rm.save_pretrained(out / "reward")
        tok.save_pretrained(out / "reward")
    return out


@dataclass
class TinyModelStageConfig(TinySpec):
    """Stage ``make_tiny_model``: build a test model into the stage folder (``@NAME``)."""

    reward: bool = key(True, "also build a reward model (sequence classifier) in reward/")


def run_stage(cfg: TinyModelStageConfig, ctx: Any) -> dict:
    """Entry point of stage kind ``make_tiny_model``."""
    spec = TinySpec(**{k: getattr(cfg, k) for k in TinySpec.__dataclass_fields__})
    make_tiny_model(ctx.out_dir, spec, reward=cfg.reward)
    return {"model": str(ctx.out_dir), "reward_model": str(ctx.out_dir / "reward") if cfg.reward else None}
