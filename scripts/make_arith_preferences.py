"""Write a learnable synthetic preference set: correct vs wrong arithmetic answers.

Output: a JSONL file of preference records (``posttrain.core.records`` format).
Each prompt asks for a sum or a difference of two-digit numbers (10..49);
``chosen`` states the correct equation, ``rejected`` the same equation with the
result of the wrong operation (the product for a sum, the sum for a
difference: the classic "applied the wrong operation" mistake). ``source`` is
``arith:add`` or ``arith:sub`` and ``meta.op`` repeats the operation, so
per-source accuracy can be reported.

Why wrong-operation answers and not near misses (off by 1..3): telling 57 from
58 needs the model to actually add, which the random-initialised tiny test
model does not learn within a CPU-test budget (measured 2026-11-22: held-out
accuracy 0.64 after 600 steps); a wrong operation gives an answer of the wrong
size for the operation, which a reward model learns in tens of steps.

Usage: python scripts/make_arith_preferences.py OUT.jsonl [--n 200] [--seed 0]
The shipped recipes/data/arith_preferences.jsonl was made with the defaults.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from posttrain.core.records import preference, write_records  # noqa: E402


def arith_preferences(n: int = 200, seed: int = 0, low: int = 10, high: int = 49) -> list[dict]:
    """``n`` distinct preference records, alternating sums and differences of ``low..high`` operands."""
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[tuple[str, int, int]] = set()
    while len(out) < n:
        op = "+" if len(out) % 2 == 0 else "-"
        a, b = rng.randint(low, high), rng.randint(low, high)
        if op == "-" and b > a:
            a, b = b, a  # keep results non-negative
        if (op, a, b) in seen or (op == "-" and a == b):
            continue  # distinct prompts, so a held-out split never repeats a training prompt
        seen.add((op, a, b))
        good = a + b if op == "+" else a - b
        bad = a * b if op == "+" else a + b
        prompt = [{"role": "user", "content": f"What is {a} {op} {b}?"}]
        out.append(preference(prompt, f"{a} {op} {b} = {good}", f"{a} {op} {b} = {bad}",
                              source="arith:add" if op == "+" else "arith:sub",
                              meta={"op": op, "error": "wrong_operation", "index": len(out)}))
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: write the records to OUT."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    n = write_records(a.out, arith_preferences(a.n, a.seed))
    print(f"{a.out}: {n} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
