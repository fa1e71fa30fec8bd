"""Spread of the fast demo's numbers across seeds: how far another machine or seed can move them.

Runs ``recipes/demo/tiny.yaml`` once per seed (``seed=N``: the recipe seed, from which every stage's
training and sampling seed is derived; the task data and the tiny model's initial weights stay fixed),
each into ``runs/demo-tiny-seed<N>`` (finished runs are reused), and prints one Markdown table: per
checkpoint and metric, the value of each seed, then the mean and the range.

    .venv/bin/python scripts/demo_spread.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("accuracy", "format_rate", "kl_to_ref")


def run_seed(seed: int, out: Path) -> list[dict]:
    """Run the tiny demo with ``seed`` into ``out`` (skipped stages when finished); return its eval rows."""
    cmd = [sys.executable, "-m", "posttrain.cli", "run", str(ROOT / "recipes/demo/tiny.yaml"),
           f"seed={seed}", f"output_dir={out}"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return [json.loads(x) for x in (out / "eval" / "eval.jsonl").read_text().splitlines() if x.strip()]


def spread_table(per_seed: dict[int, list[dict]]) -> str:
    """Markdown: checkpoint x metric, each seed's value, mean and range (max - min)."""
    seeds = sorted(per_seed)
    head = "| checkpoint | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | range |"
    lines = [head, "|---" * (len(seeds) + 4) + "|"]
    labels = [r["checkpoint"] for r in per_seed[seeds[0]]]
    for lb in labels:
        for m in METRICS:
            vals = [next((r.get(m) for r in per_seed[s] if r["checkpoint"] == lb), None) for s in seeds]
            if any(v is None for v in vals):
                continue
            lines.append(f"| {lb} | {m} | " + " | ".join(f"{v:.3f}" for v in vals)
                         + f" | {sum(vals) / len(vals):.3f} | {max(vals) - min(vals):.3f} |")
    return "\n".join(lines)


def main() -> int:
    """Run the seeds and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs")
    a = ap.parse_args()
    per_seed = {s: run_seed(s, a.out / f"demo-tiny-seed{s}") for s in a.seeds}
    print(spread_table(per_seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
