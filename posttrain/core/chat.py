"""Chat templates for training: where the assistant tokens are, so only they are trained.

Input: a tokenizer (its chat template, or the recipe's ``tokenizer.chat_template``) and
conversations. Output: the template to tokenize with (``training_template``) and per-conversation
``(input_ids, labels)`` with labels -100 outside the assistant replies (``tokenize_conversation``).

A template with ``{% generation %}`` markers is used as is. A template without them is matched
against the training variants this project ships (``posttrain/core/templates/*_training.jinja``:
Qwen2-Instruct, Qwen2.5-Instruct with tools): a variant is used when it renders every probe
conversation exactly as the tokenizer's own template does, so the text the model is trained on is
the text it sees at inference, and only the markers differ. Plain ChatML templates of other models
(SmolLM2-Instruct's, which adds its own default system turn) get a ChatML variant built with that
system turn (``chatml_variant``), held to the same identical-rendering test. The trained span of an assistant turn is
its reply and the ``<|im_end|>`` after it: not the ``<|im_start|>assistant\\n`` header, the system or
user turns, or the newline after ``<|im_end|>``. Any other template is refused with the two ways out.
"""

from __future__ import annotations

from typing import Any

from posttrain.core.errors import BadInput

TRAINING_VARIANTS = ("qwen2_instruct_training", "qwen2_5_instruct_training")

# Conversations that exercise every branch a chat template has: default and explicit system turn,
# several turns, tool calls with and without text, tool responses, a generation prompt.
_TOOL = {"type": "function", "function": {"name": "add", "description": "add two numbers",
                                          "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}
PROBES: list[dict] = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                  {"role": "assistant", "content": "6\n\nDone."}]},
    {"messages": [{"role": "user", "content": "Q"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "add 1 and 2"},
                  {"role": "assistant", "content": "",
                   "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]},
                  {"role": "tool", "content": "3"}, {"role": "tool", "content": "ok"},
                  {"role": "assistant", "content": "It is 3."}], "tools": [_TOOL]},
    {"messages": [{"role": "user", "content": "x"},
                  {"role": "assistant", "content": "Let me call it.",
                   "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2}}},
                                  {"type": "function", "function": {"name": "add", "arguments": {"a": 5}}}]}]},
]


def has_generation_markers(template: str) -> bool:
    """True when the template marks assistant spans with ``{% generation %}``."""
    import re

    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def _render(tokenizer: Any, template: str, probe: dict) -> str | None:
    try:
        return tokenizer.apply_chat_template(probe["messages"], tools=probe.get("tools"), tokenize=False,
                                             chat_template=template,
                                             add_generation_prompt=probe.get("add_generation_prompt", False))
    except Exception:  # noqa: BLE001 - a template may reject a probe (e.g. no tool support): not a match then
        return None


def matching_variant(tokenizer: Any, template: str) -> str | None:
    """Name of the shipped training variant that renders like ``template`` on every probe, or None."""
    from posttrain.core.qwen import template_text

    for name in TRAINING_VARIANTS:
        variant = template_text(name)
        same = True
        for probe in PROBES:
            want = _render(tokenizer, template, probe)
            if want is None and probe.get("tools"):
                continue  # a template without tool support is judged on the other probes
            if want is None or _render(tokenizer, variant, probe) != want:
                same = False
                break
        if same:
            return name
    return None


def chatml_variant(tokenizer: Any, template: str) -> str | None:
    """A ChatML training variant with the template's own default system turn, if it renders like ``template``.

    Many instruction models use plain ChatML and differ only in the system turn they add to a
    conversation without one (SmolLM2-Instruct: "You are a helpful AI assistant named SmolLM...").
    That turn is read off the template's rendering of the first probe and set into
    ``templates/chatml_training.jinja``; the result is then held to the same test as the shipped
    variants: identical text on every probe, or None.
    """
    import json
    import re

    from posttrain.core.qwen import template_text

    first = _render(tokenizer, template, PROBES[0])
    if first is None:
        return None
    body = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    m = re.fullmatch(r"(?:<\|im_start\|>system\n(.*?)<\|im_end\|>\n)?" + re.escape(body), first, re.S)
    if m is None:
        return None
    # a JSON string is a valid Jinja string literal (same escapes)
    default = "none" if m.group(1) is None else json.dumps(m.group(1))
    variant = "{%- set default_system = " + default + " -%}\n" + template_text("chatml_training")
    for probe in PROBES:
        want = _render(tokenizer, template, probe)
        if want is None and probe.get("tools"):
            continue
        if want is None or _render(tokenizer, variant, probe) != want:
            return None
    return variant


def training_template(tokenizer: Any, source: str = "tokenizer") -> str:
    """The chat template to tokenize with for assistant-only loss (see the module docstring)."""
    from posttrain.core.qwen import template_text

    tmpl = getattr(tokenizer, "chat_template", None)
    if not tmpl:
        raise BadInput(f"{source}: the tokenizer has no chat template (set tokenizer.chat_template in the recipe "
                       "to a Jinja file)")
    if isinstance(tmpl, dict):
        tmpl = tmpl.get("default") or next(iter(tmpl.values()))
    if has_generation_markers(tmpl):
        return tmpl
    name = matching_variant(tokenizer, tmpl)
    if name is None:
        chatml = chatml_variant(tokenizer, tmpl)
        if chatml is not None:
            return chatml
        raise BadInput(f"{source}: the chat template has no {{% generation %}} markers and renders like none of the "
                       f"known templates ({', '.join(n.removesuffix('_training') for n in TRAINING_VARIANTS)}), so the "
                       "assistant tokens cannot be located: set tokenizer.chat_template to a copy of the template "
                       "with {% generation %}...{% endgeneration %} around each reply and its end-of-turn token, or "
                       "set assistant_only_loss: false (train every token)")
    return template_text(name)


def tokenize_conversation(tokenizer: Any, messages: list[dict], template: str | None,
                          assistant_only: bool = True, tools: list | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are -100 outside assistant spans.

    The assistant span is what the template wraps in ``{% generation %}``: the reply text
    and its end-of-turn token, never the ``<|im_start|>assistant`` header.
    """
    enc = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                        chat_template=template, return_assistant_tokens_mask=assistant_only)
    ids = list(enc["input_ids"])
    if not assistant_only:
        return ids, list(ids)
    mask = enc["assistant_masks"]
    return ids, [t if m else -100 for t, m in zip(ids, mask)]


def trained_spans(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded text of each run of trained tokens (what ``posttrain preview --json`` prints)."""
    spans, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            cur.append(t)
        elif cur:
            spans.append(tokenizer.decode(cur))
            cur = []
    if cur:
        spans.append(tokenizer.decode(cur))
    return spans
