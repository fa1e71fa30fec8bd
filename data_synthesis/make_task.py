"""Stage ``make_task``: a learnable task with checkable answers, for the CPU demo and tests.

Output (in the stage folder):

* ``sft.jsonl``       demonstrations: arithmetic word problems answered as
                      ``"a + b = c. The answer is c."``
* ``prompts.jsonl``   prompt records for rejection sampling / online DPO, with
                      ``meta.answer`` (the reference) and ``meta.constraint``
* ``eval.jsonl``      held-out prompt records, same fields, disjoint from the others
* ``if_eval.jsonl``   (``n_if_eval`` > 0) held-out instruction-following prompts with
                      ``meta.verifiers`` (``evaluate(response) -> bool`` sources): a second skill that
                      no stage rewards, so evaluation can measure the alignment tax on it

``steps`` > 1 makes multi-step problems ("has 3 bags with 4 apples in each, gives away 5,
then gets 2 more"), worked as one equation per step; ``steps: 1`` with ``ops: "+-"`` is the
original two-operand task, byte for byte.

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


def make_multistep(rng: random.Random, max_operand: int, ops: str, steps: int) -> tuple[str, str, int]:
    """A word problem of ``steps`` operations: (question, worked answer, reference number).

    With ``*`` in ``ops`` the start may be a product ("3 bags with 4 apples in each"); the other steps
    add or take away, never below zero, so every intermediate count is a natural number.
    """
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    work: list[str] = []
    if "*" in ops and rng.random() < 0.5:
        bags, each = rng.randint(2, min(9, max_operand)), rng.randint(2, min(9, max_operand))
        total = bags * each
        parts = [f"{name} has {bags} bags with {each} {item} in each."]
        work.append(f"{bags} * {each} = {total}.")
        left = steps - 1
    else:
        total = rng.randint(1, max_operand)
        parts = [f"{name} has {total} {item}."]
        left = steps
    addsub = [o for o in ops if o in "+-"] or ["+"]
    for i in range(left):
        op = rng.choice(addsub) if total > 0 else "+"
        b = rng.randint(1, max_operand) if op == "+" else rng.randint(1, total)
        verb = f"gets {b} more" if op == "+" else f"gives away {b}"
        parts.append(f"{'Then ' if i else ''}{name} {verb}.")
        new = total + b if op == "+" else total - b
        work.append(f"{total} {op} {b} = {new}.")
        total = new
    q = " ".join(parts) + f" How many {item} does {name} have now?"
    return f"{q} {FORMAT}", " ".join(work) + f" The answer is {total}.", total


TOPICS = ["the ocean", "a cat", "winter", "a library", "the moon", "bicycles", "rain", "a city park", "coffee",
          "trees", "a train trip", "music", "the desert", "bread", "a lighthouse", "snow", "birds", "a market",
          "mountains", "tea", "a river", "the night sky", "gardens", "a school", "clocks", "bees", "a bridge",
          "autumn", "the wind", "a museum"]
TASKS = ["Describe {t} in one or two sentences.", "Write a short note about {t}.", "Tell me something about {t}."]
# (instruction, verifier source): each source defines evaluate(response) -> bool and runs in the sandbox
CONSTRAINTS = [
    ("Your entire reply must be in lowercase letters.",
     "def evaluate(response):\n    return response == response.lower() and any(c.isalpha() for c in response)\n"),
    ("Your entire reply must be in capital letters.",
     "def evaluate(response):\n    return response == response.upper() and any(c.isalpha() for c in response)\n"),
    ("Answer in at most 12 words.",
     "def evaluate(response):\n    return 0 < len(response.split()) <= 12\n"),
    ("Do not use any commas.",
     "def evaluate(response):\n    return ',' not in response and bool(response.strip())\n"),
    ("Start your reply with the word 'Sure'.",
     "def evaluate(response):\n    return response.strip().startswith('Sure')\n"),
    ("End your reply with the exact phrase 'That is all.'",
     "def evaluate(response):\n    return response.strip().endswith('That is all.')\n"),
    ("Include the word 'blue' in your reply.",
     "def evaluate(response):\n    return 'blue' in response.lower()\n"),
]


def if_prompts(n: int, seed: int) -> list[dict]:
    """``n`` distinct instruction-following prompt records (task x topic x constraint), shuffled by ``seed``."""
    combos = [(t, task, c) for t in TOPICS for task in TASKS for c in CONSTRAINTS]
    if n > len(combos):
        raise ValueError(f"n_if_eval: at most {len(combos)} distinct instruction-following prompts exist, got {n}")
    random.Random(seed).shuffle(combos)
    out = []
    for topic, task, (instr, src) in combos[:n]:
        q = f"{task.format(t=topic)} {instr}"
        out.append(validate({"id": record_id("make_task_if", q), "prompt": [{"role": "user", "content": q}],
                             "source": "make_task", "meta": {"verifiers": [src], "constraint": instr}}, "prompt"))
    return out


@dataclass
class TaskConfig:
    """Keys of stage ``make_task``."""

    n_sft: int = key(400, "seed demonstrations for SFT")
    n_prompts: int = key(64, "prompts for rejection sampling and online DPO")
    n_eval: int = key(64, "held-out evaluation prompts")
    max_operand: int = key(20, "operands are drawn from 1..max_operand")
    ops: str = key("+-", "which operations appear (\"+\", \"-\", and with steps >= 2 \"*\")")
    steps: int = key(1, "operations per problem (1: the two-operand task; 2-4: multi-step problems)")
    min_steps: int | None = key(None, "with steps >= 2: each problem draws its number of operations from "
                                "min_steps..steps (null: always steps)")
    n_if_eval: int = key(0, "held-out instruction-following prompts (if_eval.jsonl): an unrewarded second skill")
    seed: int = 0

    def check(self) -> None:
        """Reject impossible sizes."""
        if min(self.n_prompts, self.n_eval) < 1 or self.max_operand < 1 or self.n_sft < 0 or self.n_if_eval < 0:
            raise ValueError("n_prompts, n_eval and max_operand must be >= 1 (n_sft, n_if_eval >= 0)")
        if not 1 <= self.steps <= 4:
            raise ValueError(f"steps must be 1 to 4, got {self.steps}")
        if self.min_steps is not None and not (self.steps >= 2 and 1 <= self.min_steps <= self.steps):
            raise ValueError(f"min_steps must be 1..steps and needs steps >= 2, got min_steps {self.min_steps} "
                             f"with steps {self.steps}")
        allowed = {"+", "-", "*"} if self.steps > 1 else {"+", "-"}
        if not self.ops or set(self.ops) - allowed:
            raise ValueError(f"ops must be made of {sorted(allowed)} (\"*\" needs steps >= 2), got {self.ops!r}")


def run(cfg: TaskConfig, ctx) -> dict:
    """Entry point of stage kind ``make_task``: write the three splits (questions never repeat across them)."""
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, str, int]]] = {"eval": [], "prompts": [], "sft": []}
    sizes = {"eval": cfg.n_eval, "prompts": cfg.n_prompts, "sft": cfg.n_sft}
    space = len(NAMES) * len(ITEMS) * cfg.max_operand ** (cfg.steps + 1) * len(cfg.ops)
    if sum(sizes.values()) > space // 2:
        raise ValueError(f"make_task: {sum(sizes.values())} distinct problems asked, only about {space} exist; "
                         "raise max_operand or lower the counts")
    for split in ("eval", "prompts", "sft"):
        while len(splits[split]) < sizes[split]:
            n_ops = cfg.steps if cfg.min_steps is None else rng.randint(cfg.min_steps, cfg.steps)
            q, a, c = (make_problem(rng, cfg.max_operand, cfg.ops) if cfg.steps == 1
                       else make_multistep(rng, cfg.max_operand, cfg.ops, n_ops))
            if q not in seen:
                seen.add(q)
                splits[split].append((q, a, c))
    src = "make_task"
    if cfg.n_if_eval:
        write_records(ctx.out_dir / "if_eval.jsonl", if_prompts(cfg.n_if_eval, cfg.seed))
    write_records(ctx.out_dir / "sft.jsonl", [
        demonstration([{"role": "user", "content": q}, {"role": "assistant", "content": a}], source=src,
                      meta={"answer": c}, id=record_id(src, q)) for q, a, c in splits["sft"]])
    for split in ("prompts", "eval"):
        write_records(ctx.out_dir / f"{split}.jsonl", [
            validate({"id": record_id(src, q), "prompt": [{"role": "user", "content": q}], "source": src,
                      "meta": {"answer": c, "constraint": "final_answer_format"}}, "prompt")
            for q, _, c in splits[split]])
    return {**{k: len(v) for k, v in splits.items()}, "if_eval": cfg.n_if_eval}
