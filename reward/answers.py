"""Final-answer extraction and equivalence for math reasoning paths.

Input: a model response (free text) and a reference answer. Output: the extracted
answer string (``extract_answer``), whether two answers are equivalent
(``answers_equal``) and the one-call verifier ``is_correct(response, reference)``
that evaluation, rejection sampling and online DPO share; and the demo task's format check
(``format_ok``, ``answer_ok``: a reply must end with "The answer is N.").

Extraction tries, in a configurable order: the last ``\\boxed{...}`` (balanced
braces), the text after the last ``####`` (GSM8K style), the last "The answer is
..." phrase, and the last number in the text.

Equivalence (``answers_equal``), in this order:

1. a small pre-normalisation (``prenormalize``) of forms the ``math-verify`` library
   measurably gets wrong (each is shown to fail without it in ``tests/test_answers.py``):
   escaped dollar signs (``\\$9.50`` parses to nothing), e-notation (``1e3`` parses as
   ``1*E*3``), thousands grouped by spaces or thin spaces (``1 000`` -> 0,
   ``12\\,346`` -> 358), and plain unit words after a number (``9 dollars`` is parsed as a
   product of letters);
2. identical text after light normalisation (case, spaces, ``$``, ``\\text{}``);
3. plain numbers (integers, terminating decimals, ``a/b``, ``\\frac{a}{b}``, thousands
   commas) compare EXACTLY as rationals: ``12345`` is not ``12346``, ``3`` is not ``3.0001``;
4. plain words (``listen`` / ``silent``) are text: only step 2 can accept them (the library
   reads a word as a product of one-letter symbols, so anagrams would be "equal");
5. everything else goes to ``math-verify`` (LaTeX, sets, intervals, equations, percentages,
   units, symbolic equality, and a rounded decimal against a non-terminating value such as
   ``0.333333`` for ``1/3``, which it accepts to 6 decimal places).

Thread safety: ``math-verify`` bounds its work with ``signal.alarm``, which only works in
a main thread, and stages call this module from worker threads. So the library runs in one
helper process per host process (started on first use, this file run as a script), in that
process's main thread with the library's own timeouts on; the caller also waits at most
``MATH_VERIFY_DEADLINE_S`` for each verdict and kills and restarts the helper when a
computation cannot be interrupted (a huge integer power in C). No verdict counts as "not
equal". Inputs longer than ``MAX_SYMBOLIC_LEN`` are not sent.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from fractions import Fraction

EXTRACTORS = ("boxed", "hash", "answer_is", "last_number")
DEFAULT_ORDER: tuple[str, ...] = EXTRACTORS
MAX_SYMBOLIC_LEN = 400  # longer answers are junk for a final-answer check; skip the library
MATH_VERIFY_DEADLINE_S = 20.0  # the caller's hard limit per comparison (the helper's own limits are 5 s)
_MV_TIMEOUT_S = 5  # math-verify's own parse / compare timeouts inside the helper (whole seconds)


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


# ---------------------------------------------------------------- normalisation

_SCI = re.compile(r"(?<![\w.\\])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])")
_SPACED_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:(?:\s|\\,|\\ |\\;|\\:|~)+\d{3})+(?:\.\d+)?")
_NUMBER_THEN_WORDS = re.compile(r"([-+]?\$?\s*[\d.,]*\d)((?:\s+[A-Za-z]{3,}\.?)+)")


def prenormalize(s: str) -> str:
    """Rewrite the forms ``math-verify`` misreads (see the module docstring); everything else is kept."""
    s = s.strip()
    s = s.replace("\\$", "")  # escaped dollar: the library finds nothing to parse
    s = _SCI.sub(r"\1\\times 10^{\2}", s)  # 1e3 / 6.02e23: the library reads 1*E*3
    if _SPACED_THOUSANDS.fullmatch(s):  # "1 000", "12\,346": the library reads 1*0 and 12*346 ...
        s = re.sub(r"\s|\\,|\\ |\\;|\\:|~", "", s)
    m = _NUMBER_THEN_WORDS.fullmatch(s)
    if m:  # "9 dollars", "12,346 dollars": the library multiplies the letters
        s = m.group(1)
    return s


def normalize_text(s: str) -> str:
    """Lower-case, drop TeX wrappers, ``$``, spaces and trailing punctuation."""
    s = s.strip().lower()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^}]*)\}", lambda m: m.group(1), s)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("$", "").replace("\\%", "%")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".").strip()


_EXACT_NUM = re.compile(r"([-+−]?)(\d{1,3}(?:,\d{3})+|\d+)?(?:\.(\d*))?")
_EXACT_FRAC = re.compile(r"([-+−]?)\\?(?:d|t)?frac\{([-+−]?[\d.,]+)\}\{([-+−]?[\d.,]+)\}")


def exact_value(s: str) -> Fraction | None:
    """A plain number as an exact rational: ``-1,234.50``, ``7.``, ``.5``, ``3/4``, ``\\frac{3}{4}``; else None."""
    t = normalize_text(s)
    m = _EXACT_FRAC.fullmatch(t)
    if m:
        a, b = exact_value(m.group(2)), exact_value(m.group(3))
        if a is None or b is None or b == 0:
            return None
        return -(a / b) if m.group(1) in ("-", "−") else a / b
    if t.count("/") == 1:
        a_s, b_s = t.split("/")
        a, b = exact_value(a_s), exact_value(b_s)
        return a / b if a is not None and b is not None and b != 0 else None
    m = _EXACT_NUM.fullmatch(t)
    if not m or (m.group(2) is None and not m.group(3)):
        return None
    v = Fraction(int((m.group(2) or "0").replace(",", "")))
    if m.group(3):
        v += Fraction(int(m.group(3)), 10 ** len(m.group(3)))
    return -v if m.group(1) in ("-", "−") else v


def _terminating(q: Fraction) -> bool:
    """True when ``q`` has a finite decimal expansion (its denominator is 2^a 5^b)."""
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def is_plain_text(s: str) -> bool:
    """An answer made of words only (no digits, operators or TeX commands), e.g. ``Monday``, ``\\text{yes}``."""
    t = normalize_text(s)
    return bool(re.search(r"[a-z]{3}", t)) and not re.search(r"[\d\\=+\-*/^_(){}\[\]<>|]", t)


# ---------------------------------------------------------------- equivalence

def answers_equal(pred: str | None, ref: str | None, *, rel_tol: float | None = None,
                  abs_tol: float | None = None, use_math_verify: bool = True) -> bool:
    """True when the predicted answer matches the reference (see the module docstring for the steps).

    ``rel_tol`` and ``abs_tol`` are accepted for compatibility and have NO effect: numbers are
    compared exactly (a tolerance accepted 12345 for 12346). ``use_math_verify=False`` keeps
    steps 1-4 only (no symbolic equivalence).
    """
    del rel_tol, abs_tol  # kept in the signature only (see the docstring)
    if pred is None or ref is None:
        return False
    p, r = prenormalize(str(pred)), prenormalize(str(ref))
    if not p or not r:
        return False
    if normalize_text(p) == normalize_text(r):
        return True
    a, b = exact_value(p), exact_value(r)
    if a is not None and b is not None and (_terminating(a) and _terminating(b) or not use_math_verify):
        return a == b
    if is_plain_text(p) or is_plain_text(r):
        return False
    if use_math_verify:
        v = math_verify_equal(p, r)
        if v is not None:
            return v
    return False


def is_correct(response_text: str, reference: object, *, order: Sequence[str] = DEFAULT_ORDER,
               rel_tol: float | None = None, use_math_verify: bool = True) -> bool:
    """Extract the final answer of ``response_text`` and compare it with ``reference`` (``rel_tol``: no effect)."""
    return answers_equal(extract_answer(response_text, order), reference_answer(reference), rel_tol=rel_tol,
                         use_math_verify=use_math_verify)


# ---------------------------------------------------------------- math-verify in a helper process

class _Helper:
    """One helper process running math-verify in its main thread; callers take turns (a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.owner = -1
        self.unavailable: str | None = None

    def _start(self) -> bool:
        self.proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "--math-verify-helper"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     close_fds=True)
        self.owner = os.getpid()
        hello = self._reply(120.0)  # importing sympy takes a few seconds on a busy machine
        if not hello or not hello.get("ready"):
            self.unavailable = (hello or {}).get("error", "the math-verify helper did not start")
            self._stop()
            return False
        return True

    def _stop(self) -> None:
        if self.proc is not None:
            try:
                self.proc.kill()
            except OSError:
                pass
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        self.proc = None

    def _reply(self, timeout: float) -> dict | None:
        import select

        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()  # the helper writes whole lines
        try:
            return json.loads(line) if line else None
        except ValueError:
            return None

    def verify(self, pred: str, ref: str) -> bool | None:
        with self.lock:
            if self.unavailable:
                return None
            if self.proc is None or self.owner != os.getpid() or self.proc.poll() is not None:
                self.proc = None  # a forked child must not share its parent's helper
                if not self._start():
                    return None
            assert self.proc is not None and self.proc.stdin is not None
            try:
                self.proc.stdin.write((json.dumps({"pred": pred, "ref": ref}) + "\n").encode())
                self.proc.stdin.flush()
            except OSError:
                self._stop()
                return None
            out = self._reply(MATH_VERIFY_DEADLINE_S)
            if out is None:  # stuck in an uninterruptible computation, or died: a fresh helper next time
                self._stop()
                return None
            return out.get("equal")

    def close(self) -> None:
        with self.lock:
            if self.owner == os.getpid():
                self._stop()


_HELPER = _Helper()


def _reset_after_fork() -> None:
    global _HELPER
    _HELPER = _Helper()  # the parent's helper (and maybe its held lock) is not ours


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(lambda: _HELPER.close())


def math_verify_equal(pred: str, ref: str) -> bool | None:
    """``math-verify``'s verdict on ``pred`` against the reference ``ref``; None when it gives none.

    Safe from any thread (see the module docstring); None when the library is missing, cannot
    parse either side, the inputs are longer than ``MAX_SYMBOLIC_LEN`` or the deadline passed.
    """
    if len(pred) > MAX_SYMBOLIC_LEN or len(ref) > MAX_SYMBOLIC_LEN:
        return None
    return _HELPER.verify(pred, ref)


def _helper_main() -> None:
    """The helper process: one JSON request per line in, one ``{"equal": bool | null}`` line out."""
    import logging

    logging.disable(logging.CRITICAL)  # the library logs every timeout and parse failure
    out = os.fdopen(os.dup(1), "w")  # the protocol channel; stray prints of the library go to stderr
    sys.stdout = sys.stderr
    try:
        from math_verify import (
            ExprExtractionConfig,
            LatexExtractionConfig,
            parse,
            verify,
        )
    except ImportError as e:
        out.write(json.dumps({"ready": False, "error": f"math-verify is not installed: {e}"}) + "\n")
        out.flush()
        return
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]

    def wrap(x: str) -> str:
        return x if "$" in x or "\\boxed" in x else f"${x}$"

    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        equal = None
        try:
            req = json.loads(line)
            gold = parse(wrap(req["ref"]), configs, parsing_timeout=_MV_TIMEOUT_S)
            pred = parse(wrap(req["pred"]), configs, parsing_timeout=_MV_TIMEOUT_S)
            if gold and pred:
                equal = bool(verify(gold, pred, allow_set_relation_comp=True, timeout_seconds=_MV_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - parser errors of every kind mean: no verdict
            equal = None
        out.write(json.dumps({"equal": equal}) + "\n")
        out.flush()


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


if __name__ == "__main__" and sys.argv[1:] == ["--math-verify-helper"]:
    _helper_main()
