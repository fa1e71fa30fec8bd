"""``posttrain preview RECIPE --stage NAME``: what a trainer stage will train on, token by token.

Input: a recipe (with overrides), a trainer stage of it (``sft``, ``dpo`` or ``reward``), the first
``--rows`` records of that stage's input. Output (stdout): per row the rendered conversation with the
trained tokens marked ``[[...]]`` (in colour on a terminal), the token counts, and with ``--json``
one JSON object per row whose ``trained_spans`` are the trained tokens as text. This is the first
thing to look at when loss masking looks wrong: e.g. an SFT span must be exactly each reply and its
``<|im_end|>``.

What is marked: ``sft`` the tokens with a label (assistant replies with assistant-only loss, every
token otherwise); ``dpo`` the completion tokens of chosen and rejected (what DPO's log-probs sum
over); ``reward`` the token whose hidden state the score head reads (the conversation's last token).
The tokenizer is the stage's (with the recipe's chat template); a stage whose model is an earlier
stage's output that does not exist yet previews with that stage's own starting model's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from posttrain.core.chat import tokenize_conversation, trained_spans, training_template
from posttrain.core.errors import ConfigError
from posttrain.core.runtime import StageContext

KINDS = ("sft", "dpo", "reward")


def _tokenizer_source(recipe: Any, spec: Any) -> str | None:
    """The model reference whose tokenizer the stage will use, following @stage references that do not exist yet."""
    ref = getattr(spec.config, "model", None) or recipe.file.model.path
    seen = set()
    while ref and ref.startswith("@"):
        name = ref[1:].split("/")[0]
        if (recipe.output_dir / ref[1:]).exists() or name in seen:
            break
        seen.add(name)
        earlier = next((s for s in recipe.stages if s.name == name), None)
        ref = (getattr(earlier.config, "model", None) if earlier else None) or recipe.file.model.path
    return ref


def _marked(tokenizer: Any, ids: list[int], trained: list[bool], color: bool) -> str:
    """The decoded conversation with runs of trained tokens wrapped in markers."""
    on, off = ("\x1b[1;32m", "\x1b[0m") if color else ("[[", "]]")
    out, run, state = [], [], None
    for t, tr in zip(ids + [None], trained + [None]):
        if tr != state and run:
            text = tokenizer.decode(run)
            out.append(f"{on}{text}{off}" if state else text)
            run = []
        state = tr
        if t is not None:
            run.append(t)
    return "".join(out)


def _rows_sft(cfg: Any, ctx: Any, tok: Any, records: list[dict]) -> list[dict]:
    template = training_template(tok, ctx.tokenizer_path()) if cfg.assistant_only_loss else None
    rows = []
    for rec in records:
        ids, labels = tokenize_conversation(tok, rec["messages"], template, cfg.assistant_only_loss)
        rows.append({"id": rec["id"], "parts": [("conversation", ids, [lab != -100 for lab in labels])]})
    return rows


def _rows_dpo(tok: Any, records: list[dict]) -> list[dict]:
    rows = []
    for rec in records:
        prompt = list(tok.apply_chat_template(rec["prompt"], add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])
        parts = []
        for side in ("chosen", "rejected"):
            full = list(tok.apply_chat_template(rec["prompt"] + rec[side], tokenize=True, return_dict=True)["input_ids"])
            parts.append((side, full, [i >= len(prompt) for i in range(len(full))]))
        rows.append({"id": rec["id"], "parts": parts})
    return rows


def _rows_reward(tok: Any, records: list[dict]) -> list[dict]:
    rows = []
    for rec in records:
        parts = []
        for side in ("chosen", "rejected"):
            ids = list(tok.apply_chat_template(rec["prompt"] + rec[side], tokenize=True, return_dict=True)["input_ids"])
            parts.append((side, ids, [i == len(ids) - 1 for i in range(len(ids))]))
        rows.append({"id": rec["id"], "parts": parts})
    return rows


def preview(recipe: Any, stage: str, rows: int = 3) -> list[dict]:
    """Per row: ``{"id", "parts": [(name, ids, trained mask)]}`` plus the tokenizer (see the module docstring)."""
    spec = next((s for s in recipe.stages if s.name == stage), None)
    if spec is None:
        raise ConfigError(f"{recipe.path}: --stage: no stage named {stage!r} "
                          f"(stages: {', '.join(s.name for s in recipe.stages)})")
    if spec.kind not in KINDS:
        raise ConfigError(f"{recipe.path}: --stage {stage}: preview shows trainer stages ({', '.join(KINDS)}), "
                          f"not {spec.kind!r}")
    ctx = StageContext(recipe=recipe, spec=spec, out_dir=recipe.stage_dir(spec.name))
    src = _tokenizer_source(recipe, spec)
    tok = ctx.tokenizer(ctx.resolve_model(src) if src else None)
    kind = "demonstration" if spec.kind == "sft" else "preference"
    records = ctx.read_input(spec.config.input, kind, limit=rows)
    if spec.kind == "sft":
        out = _rows_sft(spec.config, ctx, tok, records)
    elif spec.kind == "dpo":
        out = _rows_dpo(tok, records)
    else:
        out = _rows_reward(tok, records)
    for r in out:
        r["tokenizer"] = tok
    return out


def _cmd_preview(a: argparse.Namespace) -> int:
    from posttrain.stages import load_recipe

    recipe = load_recipe(a.recipe, a.overrides)
    color = sys.stdout.isatty() and not a.json
    for r in preview(recipe, a.stage, a.rows):
        tok = r.pop("tokenizer")
        if a.json:
            print(json.dumps({"id": r["id"], "parts": [
                {"name": name, "tokens": len(ids), "trained_tokens": sum(mask),
                 "trained_spans": trained_spans(tok, ids, [t if m else -100 for t, m in zip(ids, mask)]),
                 "text": tok.decode(ids)} for name, ids, mask in r["parts"]]}, ensure_ascii=False))
            continue
        for name, ids, mask in r["parts"]:
            print(f"--- row {r['id']} {name}: {len(ids)} tokens, {sum(mask)} trained (marked)")
            print(_marked(tok, ids, mask, color))
    return 0


def add_cli(sub: Any) -> None:
    """Register ``posttrain preview``."""
    p = sub.add_parser("preview", help="show which tokens a trainer stage trains on (rendered, marked, counted)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE")
    p.add_argument("--stage", required=True, help="the sft, dpo or reward stage to preview")
    p.add_argument("--rows", type=int, default=3, help="first N rows of the stage's input")
    p.add_argument("--json", action="store_true", help="one JSON object per row with the trained spans as text")
    p.set_defaults(fn=_cmd_preview)
