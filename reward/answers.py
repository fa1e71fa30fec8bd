"""Final-answer extraction and equivalence for math reasoning paths (pure functions).

Input: a model response (free text) and a reference answer. Output: the extracted
answer string (``extract_answer``), whether two answers are equivalent
(``answers_equal``) and the one-call verifier ``is_correct(response, reference)``
that evaluation, rejection sampling and online DPO share; and the demo task's format check
(``format_ok``, ``answer_ok``: a reply must end with "The answer is N.").

Extraction tries, in a configurable order: the last ``\\boxed{...}`` (balanced
braces), the text after the last ``####`` (GSM8K style), the last "The answer is
..." phrase, and the last number in the text. Equivalence: normalised strings,
then numbers with a tolerance (fractions, ``\\frac``, thousands separators,
percent and currency signs), then the ``math-verify`` library (symbolic, LaTeX)
when it is installed; its signal-based timeouts are off because stages call it
from worker threads, so long inputs are not handed to it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction

EXTRACTORS = ("boxed", "hash", "answer_is", "last_number")
DEFAULT_ORDER: tuple[str, ...] = EXTRACTORS
_MAX_SYMBOLIC_LEN = 120  # longer strings skip math-verify (sympy can take very long on junk)


# ---------------------------------------------------------------- extraction

def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces, or None."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            best = text[m.end(): i - 1].strip()
    return best or None


def extract_hash(text: str) -> str | None:
    """The text after the last ``####`` up to the end of that line, or None."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    ans = text[idx + 4:].strip().split("\n")[0].strip()
    return ans or None


_ANSWER_IS = re.compile(r"answer\s*(?:is|=|:)\s*:?\s*(.+)", re.IGNORECASE)


def extract_answer_is(text: str) -> str | None:
    """The phrase after the last "the (final) answer is" / "answer:", up to the sentence end."""
    last = None
    for m in _ANSWER_IS.finditer(text):
        last = m
    if last is None:
        return None
    ans = last.group(1).split("\n")[0]
    ans = re.split(r"(?<!\d)\.(?!\d)|\.(?:\s|$)|;", ans)[0]  # cut at a full stop that is not a decimal point
    ans = ans.strip().strip("*").strip()
    boxed = extract_boxed(ans)
    return boxed or ans or None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def extract_last_number(text: str) -> str | None:
    """The last number in the text (integers, decimals, ``a/b``, ``1,234``), or None."""
    nums = _NUMBER.findall(text)
    return nums[-1].strip().rstrip(",") if nums else None


_EXTRACT = {"boxed": extract_boxed, "hash": extract_hash, "answer_is": extract_answer_is,
            "last_number": extract_last_number}


def extract_answer(text: str, order: Sequence[str] = DEFAULT_ORDER) -> str | None:
    """The final answer of ``text`` by the first extractor of ``order`` that finds one."""
    for name in order:
        if name not in _EXTRACT:
            raise ValueError(f"unknown answer extractor {name!r} (expected one of {', '.join(EXTRACTORS)})")
        ans = _EXTRACT[name](text or "")
        if ans:
            return ans
    return None


def reference_answer(ref: object) -> str | None:
    """A reference as a short answer string: a full GSM8K-style solution is reduced to its answer."""
    if ref is None:
        return None
    s = str(ref).strip()
    if not s:
        return None
    if "####" in s or "\\boxed" in s:
        return extract_answer(s, ("boxed", "hash"))
    return s


# ---------------------------------------------------------------- equivalence

def normalize_text(s: str) -> str:
    """Lower-case, drop TeX wrappers, ``$``, spaces and trailing punctuation."""
    s = s.strip().lower()
    s = re.sub(r"\\text\{([^}]*)\}|\\mathrm\{([^}]*)\}", lambda m: m.group(1) or m.group(2) or "", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("$", "").replace("\\%", "%")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".").strip()


def to_number(s: str) -> float | None:
    """Parse an answer as a number: ``1,234``, ``-3.5``, ``3/4``, ``\\frac{3}{4}``, ``50%``, ``$12``, ``x = 5``."""
    t = normalize_text(s)
    if "=" in t:  # "x=5": the value is the right-hand side
        t = t.rsplit("=", 1)[1]
    t = re.sub(r"^\\?(?:dfrac|tfrac|frac)", r"\\frac", t)
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", t)
    if m:
        try:
            v = float(Fraction(m.group(2)) / Fraction(m.group(3)))
        except (ValueError, ZeroDivisionError):
            return None
        return -v if m.group(1) else v
    t = t.replace("\\", "")
    t = re.sub(r"^(?:usd|us\$|rs\.?|€|£|¥)", "", t)
    t = re.sub(r"(%|percent|dollars?|cents?|units?|degrees?|°|km|m|cm|kg|g|hours?|minutes?|days?|years?)$", "", t)
    t = t.strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    try:
        if "/" in t:
            a, b = t.split("/", 1)
            return float(Fraction(a.strip()) / Fraction(b.strip()))
        v = float(t)
    except (ValueError, ZeroDivisionError):
        return None
    return v if math.isfinite(v) else None


def _math_verify_equal(pred: str, ref: str) -> bool | None:
    """``math-verify``'s verdict (None when the library is missing or cannot parse both)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    import logging

    # it warns on every call that timeouts are off (we turn them off on purpose, see the docstring)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if len(pred) > _MAX_SYMBOLIC_LEN or len(ref) > _MAX_SYMBOLIC_LEN:
        return None
    try:
        wrap = (lambda x: x if "$" in x or "\\boxed" in x else f"${x}$")
        g = parse(wrap(ref), parsing_timeout=None)
        p = parse(wrap(pred), parsing_timeout=None)
        if not g or not p:
            return None
        return bool(verify(g, p, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - the library raises many parser errors; treat as "no verdict"
        return None


def answers_equal(pred: str | None, ref: str | None, *, rel_tol: float = 1e-4, abs_tol: float = 1e-6,
                  use_math_verify: bool = True) -> bool:
    """True when the predicted answer matches the reference (string, numeric, then symbolic)."""
    if pred is None or ref is None:
        return False
    if normalize_text(pred) == normalize_text(ref):
        return True
    a, b = to_number(pred), to_number(ref)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
    if use_math_verify:
        v = _math_verify_equal(pred, ref)
        if v is not None:
            return v
    return False


def is_correct(response_text: str, reference: object, *, order: Sequence[str] = DEFAULT_ORDER,
               rel_tol: float = 1e-4, use_math_verify: bool = True) -> bool:
    """Extract the final answer of ``response_text`` and compare it with ``reference``."""
    return answers_equal(extract_answer(response_text, order), reference_answer(reference), rel_tol=rel_tol,
                         use_math_verify=use_math_verify)


# ---------------------------------------------------------------- the demo task's format (stage make_task)

FORMAT = "End your reply with 'The answer is N.'"
_FINAL = re.compile(r"The answer is (-?\d+)\.\s*$")


def final_answer(text: str) -> int | None:
    """The number in a trailing 'The answer is N.', or None."""
    m = _FINAL.search(text.strip())
    return int(m.group(1)) if m else None


def format_ok(text: str) -> bool:
    """Whether the response ends with 'The answer is N.' (the instruction's format constraint)."""
    return final_answer(text) is not None


def answer_ok(text: str, reference: int | str) -> bool:
    """Whether the response's final answer equals the reference."""
    v = final_answer(text)
    return v is not None and str(v) == str(reference).strip()
