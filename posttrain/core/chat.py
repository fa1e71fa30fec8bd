"""Chat templates for training: where the assistant tokens are, so only they are trained.

Input: a tokenizer (its chat template, or a template file named by the recipe) and
conversations. Output: the template to tokenize with (one with ``{% generation %}``
markers, so ``return_assistant_tokens_mask`` can find the assistant spans;
``training_template``) and per-conversation ``(input_ids, labels)`` with labels -100 outside
the assistant spans (``tokenize_conversation``).
"""

from __future__ import annotations

from typing import Any

from posttrain.core.errors import BadInput


def training_template(tokenizer: Any, source: str = "tokenizer") -> str:
    """The chat template to tokenize with: the tokenizer's, or TRL's training variant with generation markers."""
    tmpl = getattr(tokenizer, "chat_template", None)
    if not tmpl:
        raise BadInput(f"{source}: the tokenizer has no chat template (set tokenizer.chat_template in the recipe "
                       "to a Jinja file)")
    if isinstance(tmpl, dict):
        tmpl = tmpl.get("default") or next(iter(tmpl.values()))
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tmpl):
        return tmpl
    try:
        patched = get_training_chat_template(tokenizer)
    except Exception as e:  # noqa: BLE001 - TRL raises ValueError/KeyError for unknown templates
        raise BadInput(f"{source}: the chat template has no {{% generation %}} markers, so assistant tokens cannot "
                       f"be located ({e}); add the markers or set assistant_only_loss: false") from None
    return patched or tmpl


def tokenize_conversation(tokenizer: Any, messages: list[dict], template: str | None,
                          assistant_only: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are -100 outside assistant spans.

    The assistant span is what the template wraps in ``{% generation %}``: the reply text
    and its end-of-turn token, never the ``<|im_start|>assistant`` header.
    """
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=template,
                                        return_assistant_tokens_mask=assistant_only)
    ids = list(enc["input_ids"])
    if not assistant_only:
        return ids, list(ids)
    mask = enc["assistant_masks"]
    return ids, [t if m else -100 for t, m in zip(ids, mask)]
