"""Small text helpers shared by the judges and the synthesis stages.

Input: model replies (free text). Output: their fenced code blocks (``fenced_blocks``),
and whitespace-normalised text for de-duplication (``norm_text``). One fence grammar for
the whole project: a fence opens with three backticks, an optional language word and the
rest of that line, and closes at the next three backticks (or, with ``allow_open``, at the
end of the text: a reply cut by ``max_tokens`` leaves its last fence open).
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.S)
_OPEN_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def fenced_blocks(text: str | None, allow_open: bool = False) -> list[tuple[str, str]]:
    """``[(language in lower case, body), ...]`` of the fenced blocks of ``text``, in order."""
    pat = _OPEN_FENCE if allow_open else _FENCE
    return [(lang.lower(), body) for lang, body in pat.findall(text or "")]


def norm_text(s: str) -> str:
    """Lower-cased, whitespace-collapsed text, for de-duplication."""
    return re.sub(r"\s+", " ", s.strip().lower())
