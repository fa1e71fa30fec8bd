"""Row layouts users bring, normalised to this project's canonical records.

Input: one row (a dict read from JSONL, Parquet, a ``datasets`` folder or a hub dataset), the
record kind a stage wants (``demonstration``, ``preference``, ``prompt`` or None: detect) and a
location string (``file:line``) for messages. Output: ``normalise(row, kind, where)`` ->
``(kind, record)`` with the canonical fields of ``posttrain.core.records`` (conversational
messages), or a ``RecordError`` of one line naming the location and what is wrong.

Layouts read (TRL's dataset types, plus two common instruction formats):

=====================================  =========================================================
columns                                becomes
=====================================  =========================================================
``messages``                           demonstration (TRL conversational language modelling)
``text``                               demonstration trained on every token, no chat template
``prompt`` + ``completion``            demonstration ``prompt + completion`` (a string prompt is
                                       one user turn, a string completion one assistant turn)
``conversations`` (ShareGPT)           demonstration (``from``: human/gpt/system/tool)
``instruction`` + ``output`` (Alpaca)  demonstration (``input`` appended to the instruction)
``prompt`` + ``chosen`` + ``rejected``  preference; string prompt/completions become one user /
                                       assistant turn; completions that repeat the prompt turns
                                       (HuggingFaceH4/ultrafeedback_binarized) are cut after them
``chosen`` + ``rejected``              implicit prompt: see ``implicit_prompt`` / ``implicit_text_prompt``
``prompt``                             prompt
``prompt`` + ``completion`` + ``label``  unpaired preference: refused (no stage trains on it)
=====================================  =========================================================

Plain-string ("standard") rows are read as one-turn chats: every trainer here renders the
model's chat template, so a string prompt is the user turn and a string response the
assistant turn. Only ``text`` rows are trained as raw text. Rows already in the canonical
layout keep their other top-level fields; converted rows keep the columns that were not
consumed under ``meta["original"]`` and name their layout in ``meta["layout"]``.

Messages are checked here too: a ``role`` of system/user/assistant/tool, a string ``content``
(a list of ``{"type": "text", "text": ...}`` parts is joined; a null content is allowed only
beside ``tool_calls``), and null keys that columnar formats add to every message are dropped.
"""

from __future__ import annotations

import json
from typing import Any

from posttrain.core.errors import RecordError

ROLES = ("system", "user", "assistant", "tool")
DEMONSTRATION = "demonstration"
PREFERENCE = "preference"
PROMPT = "prompt"
KINDS = (DEMONSTRATION, PREFERENCE, PROMPT)

# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "tool": "tool"}


# ---------------------------------------------------------------- messages

def _content(m: dict, where: str, path: str) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if c is None:
        if m.get("tool_calls"):
            return ""  # an assistant turn that only calls tools (OpenAI writes content: null)
        raise RecordError(f"{where}: {path}.content is null (expected a string)")
    if isinstance(c, list):  # OpenAI-style content parts: only text parts can be trained here
        texts = []
        for j, part in enumerate(c):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RecordError(f"{where}: {path}.content[{j}]: only text parts are supported, got {kind!r}")
        return "".join(texts)
    raise RecordError(f"{where}: {path}.content must be a string, got {type(c).__name__}")


def coerce_messages(msgs: Any, where: str, field: str) -> list[dict]:
    """A checked copy of a message list (see the module docstring); raises RecordError naming ``field``."""
    if isinstance(msgs, str):
        raise RecordError(f"{where}: '{field}' must be a list of {{role, content}} messages, got a string")
    if not isinstance(msgs, (list, tuple)) or not msgs:
        got = "an empty list" if isinstance(msgs, (list, tuple)) else type(msgs).__name__
        raise RecordError(f"{where}: '{field}' must be a non-empty list of {{role, content}} messages, got {got}")
    out = []
    for i, m in enumerate(msgs):
        path = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"{where}: {path} must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise RecordError(f"{where}: {path}.role must be one of {', '.join(ROLES)}, got {role!r}")
        new = {k: v for k, v in m.items() if v is not None}  # columnar formats fill absent keys with nulls
        new["content"] = _content(m, where, path)
        out.append(new)
    return out


def _turns(value: Any, role: str, where: str, field: str) -> list[dict]:
    """A string as one ``role`` turn (without the spaces that joined it to the text around it), or a
    checked message list."""
    if isinstance(value, str):
        return [{"role": role, "content": value.strip()}]
    return coerce_messages(value, where, field)


def _same_turn(a: dict, b: dict) -> bool:
    return a.get("role") == b.get("role") and a.get("content", "").strip() == b.get("content", "").strip()


def prompt_of_messages(msgs: list[dict], where: str) -> list[dict]:
    """The turns before the last assistant turn (the whole list when there is none)."""
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    if last == 0:
        raise RecordError(f"{where}: the conversation starts with the assistant reply, so it has no prompt")
    return msgs[:last]


# ---------------------------------------------------------------- implicit prompts

def implicit_prompt(chosen: list[dict], rejected: list[dict], where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) of conversations that share their leading turns (TRL's implicit prompt).

    The prompt is the longest run of identical leading turns, shortened when needed so both
    completions keep at least one turn (identical conversations then differ in nothing, which the
    record audit counts as ``chosen_equals_rejected``).
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    n = min(n, len(chosen) - 1, len(rejected) - 1)
    if n <= 0:
        raise RecordError(f"{where}: no 'prompt' column and 'chosen' / 'rejected' share no leading turn, "
                          "so there is no implicit prompt: add a 'prompt' column")
    return chosen[:n], chosen[n:], rejected[n:]


def implicit_text_prompt(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of two strings that start with the same prompt text.

    TRL cuts at the first differing character, which can split a word ("The sky is bl" + "ue").
    Here the cut is the last whitespace within the common prefix that leaves both completions
    non-empty: prompt "The sky is", completions "blue." / "green." (surrounding spaces are dropped,
    since the parts become separate chat turns).
    """
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    for i in range(k, 0, -1):
        if chosen[i - 1].isspace() and chosen[i:].strip() and rejected[i:].strip() and chosen[:i].strip():
            return chosen[:i].strip(), chosen[i:].strip(), rejected[i:].strip()
    raise RecordError(f"{where}: no 'prompt' column and 'chosen' / 'rejected' share no leading words, "
                      "so there is no implicit prompt: add a 'prompt' column")


# ---------------------------------------------------------------- layouts

def layout_of(row: dict) -> str:
    """The name of a row's layout, from its non-null columns."""
    has = {k for k, v in row.items() if v is not None}
    if {"chosen", "rejected"} <= has:
        return "preference"
    if "chosen" in has or "rejected" in has:
        return "half_preference"
    if {"prompt", "completion", "label"} <= has:
        return "unpaired_preference"
    if "messages" in has:
        return "messages"
    if {"prompt", "completion"} <= has:
        return "prompt_completion"
    if "conversations" in has:
        return "sharegpt"
    if {"instruction", "output"} <= has:
        return "alpaca"
    if "text" in has and "prompt" not in has:
        return "text"
    if "prompt" in has:
        return "prompt"
    return "unknown"


def _sharegpt(turns: Any, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{where}: 'conversations' must be a non-empty list of turns")
    msgs = []
    for i, t in enumerate(turns):
        if isinstance(t, dict) and "role" in t:  # some ShareGPT exports already use role/content
            msgs.append(t)
            continue
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise RecordError(f"{where}: conversations[{i}] must be an object with 'from' and a string 'value'")
        role = SHAREGPT_ROLES.get(str(t.get("from")).lower())
        if role is None:
            raise RecordError(f"{where}: conversations[{i}].from must be one of {', '.join(SHAREGPT_ROLES)}, "
                              f"got {t.get('from')!r}")
        msgs.append({"role": role, "content": t["value"]})
    return coerce_messages(msgs, where, "conversations")


def _alpaca(row: dict, where: str) -> list[dict]:
    for k in ("instruction", "output"):
        if not isinstance(row[k], str):
            raise RecordError(f"{where}: '{k}' must be a string")
    msgs = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) and row["system"] else []
    for j, pair in enumerate(row.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError(f"{where}: history[{j}] must be a [question, answer] pair of strings")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    extra = row.get("input")
    user = row["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def _demonstration(row: dict, layout: str, where: str) -> tuple[dict, set[str]]:
    """Canonical demonstration fields of a row, and the columns they consumed."""
    if layout == "messages":
        return {"messages": coerce_messages(row["messages"], where, "messages")}, {"messages"}
    if layout == "prompt_completion":
        msgs = _turns(row["prompt"], "user", where, "prompt") + _turns(row["completion"], "assistant", where,
                                                                        "completion")
        return {"messages": msgs}, {"prompt", "completion"}
    if layout == "sharegpt":
        return {"messages": _sharegpt(row["conversations"], where)}, {"conversations"}
    if layout == "alpaca":
        return {"messages": _alpaca(row, where)}, {"instruction", "input", "output", "system", "history"}
    if layout == "text":
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise RecordError(f"{where}: 'text' must be a non-empty string")
        return {"text": row["text"]}, {"text"}
    raise AssertionError(layout)


def _preference(row: dict, where: str) -> tuple[dict, set[str], str]:
    """Canonical preference fields of a row, the columns consumed and the precise layout name."""
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RecordError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists")
    if isinstance(chosen, str):
        if prompt is None:
            prompt, chosen, rejected = implicit_text_prompt(chosen, rejected, where)
            name = "standard_implicit_prompt_preference"
        else:
            name = "standard_preference" if isinstance(prompt, str) else "conversational_prompt_string_completions"
        p = _turns(prompt, "user", where, "prompt")
        return ({"prompt": p, "chosen": _turns(chosen, "assistant", where, "chosen"),
                 "rejected": _turns(rejected, "assistant", where, "rejected")}, {"prompt", "chosen", "rejected"}, name)
    c = coerce_messages(chosen, where, "chosen")
    r = coerce_messages(rejected, where, "rejected")
    if prompt is None:
        p, c, r = implicit_prompt(c, r, where)
        name = "conversational_implicit_prompt_preference"
    else:
        p = _turns(prompt, "user", where, "prompt")
        n = len(p)
        if len(c) > n and len(r) > n and all(_same_turn(a, b) for a, b in zip(p, c)) \
                and all(_same_turn(a, b) for a, b in zip(p, r)):
            c, r = c[n:], r[n:]  # the completions repeat the prompt turns (ultrafeedback_binarized)
            name = "prompt_repeated_in_completions"
        else:
            name = "conversational_preference" if isinstance(prompt, list) else "string_prompt_preference"
    return {"prompt": p, "chosen": c, "rejected": r}, {"prompt", "chosen", "rejected"}, name


_REFUSE = {
    "unpaired_preference": "an unpaired preference row (prompt, completion, label): no stage here trains on "
                           "unpaired preferences (KTO does); pair them into prompt/chosen/rejected rows",
}
_WANTS = {DEMONSTRATION: "demonstrations (messages, text, prompt+completion, conversations or instruction+output)",
          PREFERENCE: "preference pairs (chosen and rejected, with or without prompt)",
          PROMPT: "prompts (prompt, messages, or any demonstration/preference layout)"}
_LAYOUT_WORDS = {"messages": "a conversation ('messages')", "text": "a language-modelling row ('text')",
                 "prompt_completion": "a prompt-completion row", "sharegpt": "a ShareGPT row ('conversations')",
                 "alpaca": "an Alpaca row (instruction/output)", "prompt": "a prompt-only row",
                 "preference": "a preference row (chosen/rejected)"}


def _canonical(row: dict, layout: str, kind: str) -> bool:
    """Rows already in this project's layout keep their extra top-level fields untouched."""
    if kind == PROMPT:
        return layout in ("prompt", "messages") and "prompt" in row
    if kind == DEMONSTRATION:
        return layout == "messages" and not ({"prompt", "chosen", "rejected", "completion"} & set(row))
    return (layout == "preference" and all(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected"))
            and row["chosen"][:1] != row["prompt"][:1])


def normalise(row: Any, kind: str | None, where: str) -> tuple[str, dict]:
    """(kind, canonical record) of one row of any supported layout; raises RecordError naming ``where``."""
    if not isinstance(row, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    nulls = sorted(k for k, v in row.items() if v is None)
    row = {k: v for k, v in row.items() if v is not None}  # columnar formats fill absent columns with nulls
    if isinstance(row.get("meta"), str):  # columnar formats carry meta as a JSON string
        try:
            row["meta"] = json.loads(row["meta"])
        except json.JSONDecodeError:
            row["meta"] = {"raw": row["meta"]}
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    layout = layout_of(row)
    if kind == DEMONSTRATION and layout == "preference" and "messages" in row:
        layout = "messages"  # HuggingFaceH4/ultrafeedback_binarized also carries the chosen conversation
    if layout == "half_preference":
        missing = "rejected" if "chosen" in row else "chosen"
        raise RecordError(f"{where}: '{missing}' is missing (a preference row needs both 'chosen' and 'rejected')")
    if layout in _REFUSE and not (kind == PROMPT and layout == "unpaired_preference"):
        raise RecordError(f"{where}: {_REFUSE[layout]}")
    if layout == "unknown":
        wants = _WANTS.get(kind or "", "a TRL dataset layout (messages, text, prompt, prompt+completion, "
                                       "prompt+chosen+rejected)")
        cols = sorted(row) + [f"{k}=null" for k in nulls]
        raise RecordError(f"{where}: unknown record layout (columns: {', '.join(cols) or 'none'}); expected {wants}")
    want = kind or (PREFERENCE if layout == "preference" else PROMPT if layout == "prompt" else DEMONSTRATION)
    if want == PREFERENCE and layout != "preference":
        extra = ": only sft trains on text rows" if layout == "text" else ""
        raise RecordError(f"{where}: {_LAYOUT_WORDS[layout]} where {_WANTS[PREFERENCE]} are expected{extra}")
    if want == DEMONSTRATION and layout in ("preference", "prompt"):
        raise RecordError(f"{where}: {_LAYOUT_WORDS[layout]} where {_WANTS[DEMONSTRATION]} are expected")
    if want == PROMPT and layout == "text":
        raise RecordError(f"{where}: a language-modelling row ('text') has no prompt: this stage needs "
                          f"{_WANTS[PROMPT]}")
    if _canonical(row, layout, want):
        fields = ("prompt",) if want == PROMPT else ("messages",) if want == DEMONSTRATION else (
            "prompt", "chosen", "rejected")
        for f in fields:
            row[f] = _turns(row[f], "user", where, f) if f == "prompt" else coerce_messages(row[f], where, f)
        return want, row
    if want == PROMPT:
        # only the prompt is taken: every other column (the reference reply too) stays in meta.original
        if "prompt" in row:
            fields = {"prompt": _turns(row["prompt"], "user", where, "prompt")}
        elif layout == "preference":
            fields = {"prompt": _preference(row, where)[0]["prompt"]}
        else:
            fields = {"prompt": prompt_of_messages(_demonstration(row, layout, where)[0]["messages"], where)}
        return want, _with_meta(row, fields, {"prompt"}, layout, want, where)
    if layout == "preference":
        fields, used, layout = _preference(row, where)
    else:
        fields, used = _demonstration(row, layout, where)
    return want, _with_meta(row, fields, used, layout, want, where)


def _with_meta(row: dict, fields: dict, used: set[str], layout: str, kind: str, where: str) -> dict:
    """A converted record: canonical fields, id/source/margin carried over, other columns in meta."""
    meta = row.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise RecordError(f"{where}: 'meta' must be an object")
    meta = dict(meta or {})
    rec: dict = dict(fields)
    used = set(used) | {"meta"}
    if isinstance(row.get("id"), (str, int)) and not isinstance(row["id"], bool) and str(row["id"]):
        rec["id"] = str(row["id"])
        used.add("id")
    if isinstance(row.get("source"), str):
        rec["source"] = row["source"]
        used.add("source")
    if kind == PREFERENCE and isinstance(row.get("margin"), (int, float)) and not isinstance(row["margin"], bool):
        rec["margin"] = float(row["margin"])
        used.add("margin")
    original = {k: v for k, v in row.items() if k not in used}
    meta["layout"] = layout
    if original:
        meta["original"] = original
    rec["meta"] = meta
    return rec
