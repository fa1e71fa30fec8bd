"""Tiny local Qwen2 models for tests and the CPU demo (no network needed).

Output folder layout written by ``make_tiny_model(out_dir)``::

    OUT/            Qwen2ForCausalLM (GQA, tied embeddings) + tokenizer
    OUT/reward/     Qwen2ForSequenceClassification (num_labels=1) + tokenizer

The tokenizer is a byte-level BPE trained with ``tokenizers`` on generated text
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
    """Size of the tiny model (the defaults train at tens of ms per step on 2 cores)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 1024
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    seed: int = 0


def make_tiny_model(out_dir: str | Path, spec: TinySpec | None = None, reward: bool = True) -> Path:
    """Write the tiny causal LM (+ tokenizer) to ``out_dir`` and the reward model to ``out_dir/reward``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(spec.vocab_size, spec.seed)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True, initializer_range=spec.initializer_range, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=eos, pad_token_id=pad, use_cache=True,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if reward:
        torch.manual_seed(spec.seed + 1)
        d = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id")}
        rcfg = Qwen2Config(**d, num_labels=1)
        rm = Qwen2ForSequenceClassification(rcfg).to(torch.float32)
        # Start the reward model from the policy's trunk, as reward models usually start from the SFT model.
        rm.model.load_state_dict(model.model.state_dict())
        rm.save_pretrained(out / "reward")
        tok.save_pretrained(out / "reward")
    return out


@dataclass
class TinyModelStageConfig(TinySpec):
    """Stage ``make_tiny_model``: build the tiny model into the stage folder (``@NAME``)."""

    reward: bool = True


def run_stage(cfg: TinyModelStageConfig, ctx) -> dict:
    """Entry point of stage kind ``make_tiny_model``."""
    spec = TinySpec(**{k: getattr(cfg, k) for k in TinySpec.__dataclass_fields__})
    make_tiny_model(ctx.out_dir, spec, reward=cfg.reward)
    return {"model": str(ctx.out_dir), "reward_model": str(ctx.out_dir / "reward") if cfg.reward else None}
