"""Stage ``make_task``: a learnable task with checkable answers, for the CPU demo and tests.

Output (in the stage folder):

* ``sft.jsonl``       demonstrations: arithmetic word problems answered as
                      ``"a + b = c. The answer is c."``
* ``prompts.jsonl``   prompt records for rejection sampling / online DPO, with
                      ``meta.answer`` (the reference) and ``meta.constraint``
* ``eval.jsonl``      held-out prompt records, same fields, disjoint from the others

The instruction also asks for a format ("end with 'The answer is N.'"), which
``format_ok`` checks; ``answer_ok`` checks the number. Both are pure functions
used by evaluation and as verifier rewards.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from posttrain.core.config import key
from posttrain.core.records import demonstration, record_id, validate, write_records
from reward.answers import FORMAT

NAMES = ["Tom", "Ana", "Li", "Sam", "Mia", "Omar", "Ivy", "Ben", "Zoe", "Raj", "Eva", "Kai"]
ITEMS = ["apples", "books", "coins", "shells", "stamps", "pens", "cards", "eggs", "cups", "rocks"]


def make_problem(rng: random.Random, max_operand: int, ops: str) -> tuple[str, str, int]:
    """One word problem: (question, worked answer, reference number)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    op = rng.choice(ops)
    a = rng.randint(1, max_operand)
    if op == "+":
        b = rng.randint(1, max_operand)
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have?"
        c = a + b
    else:
        b = rng.randint(1, a)
        q = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"
        c = a - b
    return f"{q} {FORMAT}", f"{a} {op} {b} = {c}. The answer is {c}.", c


@dataclass
class TaskConfig:
    """Keys of stage ``make_task``."""

    n_sft: int = key(400, "seed demonstrations for SFT")
    n_prompts: int = key(64, "prompts for rejection sampling and online DPO")
    n_eval: int = key(64, "held-out evaluation prompts")
    max_operand: int = key(20, "operands are drawn from 1..max_operand")
    ops: str = key("+-", "which operations appear (\"+\", \"-\")")
    seed: int = 0

    def check(self) -> None:
        """Reject impossible sizes."""
        if min(self.n_sft, self.n_prompts, self.n_eval) < 1 or self.max_operand < 1:
            raise ValueError("n_sft, n_prompts, n_eval and max_operand must be >= 1")
        if not self.ops or set(self.ops) - {"+", "-"}:
            raise ValueError(f"ops must be made of '+' and '-', got {self.ops!r}")


def run(cfg: TaskConfig, ctx) -> dict:
    """Entry point of stage kind ``make_task``: write the three splits (questions never repeat across them)."""
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, str, int]]] = {"eval": [], "prompts": [], "sft": []}
    sizes = {"eval": cfg.n_eval, "prompts": cfg.n_prompts, "sft": cfg.n_sft}
    space = len(NAMES) * len(ITEMS) * cfg.max_operand ** 2 * len(cfg.ops)
    if sum(sizes.values()) > space // 2:
        raise ValueError(f"make_task: {sum(sizes.values())} distinct problems asked, only about {space} exist; "
                         "raise max_operand or lower the counts")
    for split in ("eval", "prompts", "sft"):
        while len(splits[split]) < sizes[split]:
            q, a, c = make_problem(rng, cfg.max_operand, cfg.ops)
            if q not in seen:
                seen.add(q)
                splits[split].append((q, a, c))
    src = "make_task"
    write_records(ctx.out_dir / "sft.jsonl", [
        demonstration([{"role": "user", "content": q}, {"role": "assistant", "content": a}], source=src,
                      meta={"answer": c}, id=record_id(src, q)) for q, a, c in splits["sft"]])
    for split in ("prompts", "eval"):
        write_records(ctx.out_dir / f"{split}.jsonl", [
            validate({"id": record_id(src, q), "prompt": [{"role": "user", "content": q}], "source": src,
                      "meta": {"answer": c, "constraint": "final_answer_format"}}, "prompt")
            for q, _, c in splits[split]])
    return {k: len(v) for k, v in splits.items()}
