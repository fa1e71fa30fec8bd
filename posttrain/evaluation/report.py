"""Stage ``report``: a Markdown report with PNG plots of a whole run.

Input: the run's output folder — every stage folder's ``loss_log.jsonl``
(trainers: ``step``, ``loss``), online DPO's per-episode ``metrics.jsonl``
(``reward_mean``), the reward model's evaluation JSON (``accuracy``), and the
``eval`` stage's ``eval.jsonl`` / ``samples.jsonl``. Output (stage folder, and
``report.md`` copied to the run's output folder):

* ``report.md``          results table, findings stated from the numbers, samples
* ``loss.png``           training loss per stage (online DPO: mean DPO loss per episode)
* ``reward.png``         reward per online-DPO episode
* ``accuracy.png``       accuracy / instruction following / reward / KL per checkpoint,
                         with bootstrap 95% intervals as error bars

Findings are computed, not written by hand: a stage that did not help is
reported as such.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.evaluation.evaluate import format_table
from posttrain.evaluation.stats import excludes_zero, paired_diff_ci
from posttrain.core.config import key


@dataclass
class ReportConfig:
    """Keys of stage ``report``."""

    eval: str = key(doc="the eval stage's folder (@eval)", input=True)
    title: str = "qwen2-posttrain run report"
    baseline: str | None = key(None, "eval row of the untrained model (for \"SFT beats untrained\")")
    sft: str | None = key(None, "eval row of the SFT model (reference for the alignment tax)")
    compare: list[str] = key(factory=list, doc="eval rows of aligned models to compare against `sft`")
    samples_per_checkpoint: int = 2


def _jsonl(p: Path) -> list[dict]:
    rows = []
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # torn last line of a killed run
    return rows


def collect(run_dir: Path) -> dict[str, Any]:
    """Gather logs of every stage folder under ``run_dir`` (in manifest order when available)."""
    stages: dict[str, dict] = {}
    resolved = run_dir / "recipe.resolved.yaml"
    order: list[str] = []
    if resolved.exists():
        import yaml

        order = [s["name"] for s in yaml.safe_load(resolved.read_text()).get("stages", [])]
    for name in order or sorted(p.name for p in run_dir.iterdir() if p.is_dir()):
        d = run_dir / name
        if not d.is_dir():
            continue
        info: dict[str, Any] = {"kind": None}
        if (d / "manifest.json").exists():
            info["kind"] = json.loads((d / "manifest.json").read_text()).get("kind")
        loss = [r for r in _jsonl(d / "loss_log.jsonl") if "loss" in r]
        if loss:
            info["loss"] = loss
        eps = [r for r in _jsonl(d / "metrics.jsonl") if "reward_mean" in r]
        if eps:
            info["episodes"] = eps
            if "loss" not in info and all("loss" in e for e in eps):  # online DPO: one DPO loss per episode
                info["loss"] = [{"step": e.get("episode", i), "loss": e["loss"]} for i, e in enumerate(eps)]
        for f in sorted(d.glob("eval*.json")):
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict) and isinstance(data.get("heldout"), dict):
                data = data["heldout"]  # the reward stage nests its held-out numbers
            if isinstance(data, dict) and "accuracy" in data:
                info["heldout"] = data
        stages[name] = info
    return stages


def _plots(stages: dict[str, dict], rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    losses = {n: s["loss"] for n, s in stages.items() if "loss" in s}
    if losses:
        fig, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3.2), squeeze=False)
        for ax, (n, rs) in zip(axes[0], losses.items()):
            ax.plot([r.get("step", i) for i, r in enumerate(rs)], [r["loss"] for r in rs])
            ax.set_title(f"{n} ({stages[n]['kind']})")
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
        made.append("loss.png")
    eps = {n: s["episodes"] for n, s in stages.items() if "episodes" in s}
    if eps:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for n, rs in eps.items():
            xs, ys = [r.get("episode", i) for i, r in enumerate(rs)], [r["reward_mean"] for r in rs]
            line, = ax.plot(xs, ys, marker="o", alpha=0.6, label=n)
            if len(ys) >= 2:
                k = trend(ys)
                c = sum(ys) / len(ys) - k * (len(ys) - 1) / 2
                ax.plot(xs, [c + k * i for i in range(len(ys))], "--", color=line.get_color(), label=f"{n} trend")
        ax.set_xlabel("episode")
        ax.set_ylabel("mean reward of sampled responses")
        ax.legend()
        ax.set_title("online DPO: reward per episode")
        fig.tight_layout()
        fig.savefig(out / "reward.png", dpi=100)
        plt.close(fig)
        made.append("reward.png")
    metrics = [m for m in ("accuracy", "if_pass_rate", "format_rate", "reward_mean", "kl_to_ref")
               if any(m in r for r in rows)]
    if rows and metrics:
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            ys = [r.get(m, 0.0) or 0.0 for r in rows]
            cis = [r.get(f"{m}_ci") for r in rows]
            err = None
            if all(isinstance(c, list) for c in cis):  # bootstrap 95% intervals as error bars
                err = [[max(0.0, y - c[0]) for y, c in zip(ys, cis)], [max(0.0, c[1] - y) for y, c in zip(ys, cis)]]
            ax.bar([r["checkpoint"] for r in rows], ys, yerr=err, capsize=3)
            ax.set_title(m if err is None else f"{m} (95% CI)")
            if m == "kl_to_ref":
                ax.set_yscale("symlog", linthresh=1.0)  # the untrained model's KL dwarfs the others
            ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=100)
        plt.close(fig)
        made.append("accuracy.png")
    return made


def trend(ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against 0..n-1."""
    n = len(ys)
    mx, my = (n - 1) / 2, sum(ys) / n
    den = sum((i - mx) ** 2 for i in range(n))
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / den if den else 0.0


def findings(rows: list[dict], stages: dict[str, dict], cfg: ReportConfig) -> list[str]:
    """Plain statements derived from the numbers (including when a stage did not help)."""
    by = {r["checkpoint"]: r for r in rows}
    out = []
    if cfg.baseline in by and cfg.sft in by and "accuracy" in by[cfg.sft]:
        b, s = by[cfg.baseline]["accuracy"], by[cfg.sft]["accuracy"]
        verdict = "SFT helped" if s > b else "SFT did NOT improve accuracy"
        out.append(f"{verdict}: held-out accuracy {b:.3f} ({cfg.baseline}) -> {s:.3f} (SFT).")
    for n, s in stages.items():
        if "heldout" in s:
            h = s["heldout"]
            out.append(f"Reward model `{n}`: held-out preference accuracy {h['accuracy']:.3f}"
                       + (f" on {h['n']} pairs" if "n" in h else "")
                       + (f", mean margin {h['mean_margin']:.3f}" if "mean_margin" in h else "") + ".")
        if "episodes" in s and len(s["episodes"]) >= 2:
            ys = [e["reward_mean"] for e in s["episodes"]]
            half = len(ys) // 2
            a, b = sum(ys[:half]) / half, sum(ys[half:]) / (len(ys) - half)
            verb = "raised" if b > a else "did NOT raise"
            out.append(f"Online DPO `{n}` {verb} the mean reward of its samples: {a:.3f} (first {half} episodes) -> "
                       f"{b:.3f} (last {len(ys) - half}); per-episode slope {trend(ys):+.4f} "
                       "(each episode samples different prompts, so single episodes are noisy).")
    if cfg.sft in by:
        ref = by[cfg.sft]
        for c in cfg.compare:
            if c not in by:
                continue
            r = by[c]
            parts = []
            if "reward_mean" in r and "reward_mean" in ref:
                parts.append(f"reward-model score {r['reward_mean'] - ref['reward_mean']:+.3f}")
            if "accuracy" in r and "accuracy" in ref and not paired(r, ref, "accuracy"):
                tax = ref["accuracy"] - r["accuracy"]
                parts.append(f"accuracy {r['accuracy'] - ref['accuracy']:+.3f} "
                             f"(alignment tax {tax:+.3f})")
            if "kl_to_ref" in r:
                parts.append(f"KL to SFT {r['kl_to_ref']:.3f}")
            if parts:
                out.append(f"`{c}` vs SFT: " + ", ".join(parts) + ".")
    out += interval_findings(by, cfg)
    return out


def paired(a: dict, b: dict, metric: str) -> bool:
    """Whether both rows carry per-item verdicts of ``metric`` on the same number of items."""
    va, vb = a.get("verdicts", {}).get(metric), b.get("verdicts", {}).get(metric)
    return bool(va) and bool(vb) and len(va) == len(vb)


def _diff(by: dict[str, dict], a: str, b: str, metric: str, what: str) -> str | None:
    """One sentence on ``a - b`` in ``metric`` with its paired bootstrap interval, or None without verdicts."""
    if a not in by or b not in by or not paired(by[a], by[b], metric):
        return None
    d, lo, hi = paired_diff_ci(by[a]["verdicts"][metric], by[b]["verdicts"][metric])
    verdict = ("the interval excludes 0" if excludes_zero(lo, hi)
               else "the interval includes 0: no difference shown")
    return f"{what}: `{a}` - `{b}` = {d:+.3f} (paired bootstrap 95% interval [{lo:+.3f}, {hi:+.3f}]; {verdict})."


def interval_findings(by: dict[str, dict], cfg: ReportConfig) -> list[str]:
    """Differences between checkpoints on the same held-out items, each with its paired 95% interval.

    Accuracy (the rewarded skill) of every aligned model against the base model and against SFT;
    the instruction-following pass rate (the unrewarded skill) against SFT: its drop is the
    alignment tax; and the two aligned models against each other when there are exactly two
    (the merging trade-off).
    """
    out = []
    for c in cfg.compare + ([cfg.sft] if cfg.sft else []):
        if cfg.baseline and c != cfg.baseline:
            out.append(_diff(by, c, cfg.baseline, "accuracy", "Accuracy vs the base model"))
    for c in cfg.compare:
        if cfg.sft:
            out.append(_diff(by, c, cfg.sft, "accuracy", "Accuracy vs SFT"))
            out.append(_diff(by, c, cfg.sft, "if_pass_rate", "Unrewarded skill (instruction following) vs SFT, "
                             "negative = alignment tax"))
    if cfg.baseline and cfg.sft:
        out.append(_diff(by, cfg.sft, cfg.baseline, "if_pass_rate", "Unrewarded skill, SFT vs base"))
    if len(cfg.compare) >= 2:
        a, b = cfg.compare[-2], cfg.compare[-1]
        out.append(_diff(by, a, b, "accuracy", "Merging trade-off, accuracy"))
        out.append(_diff(by, a, b, "if_pass_rate", "Merging trade-off, unrewarded skill"))
    return [x for x in out if x]


def write_report(run_dir: Path, eval_dir: Path, out: Path, cfg: ReportConfig) -> Path:
    """Write report.md and plots into ``out``; return the report path."""
    out.mkdir(parents=True, exist_ok=True)
    rows = _jsonl(eval_dir / "eval.jsonl")
    samples = _jsonl(eval_dir / "samples.jsonl")
    stages = collect(run_dir)
    plots = _plots(stages, rows, out)
    lines = [f"# {cfg.title}", "", f"Run folder: `{run_dir}`", "", "## Results (held-out split)", "",
             format_table(rows) if rows else "_no evaluation rows_", "", "## Findings", ""]
    lines += [f"- {f}" for f in findings(rows, stages, cfg)] or ["- (none computed)"]
    lines += [""]
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    lines += ["## Training stages", "", "| stage | kind | first loss | last loss | steps |", "|---|---|---|---|---|"]
    for n, s in stages.items():
        if "loss" in s:
            lines.append(f"| {n} | {s['kind']} | {s['loss'][0]['loss']:.4f} | {s['loss'][-1]['loss']:.4f} | {len(s['loss'])} |")
    lines += ["", "## Sample responses", ""]
    per: dict[str, int] = {}
    for s in samples:
        if per.get(s["checkpoint"], 0) >= cfg.samples_per_checkpoint:
            continue
        per[s["checkpoint"]] = per.get(s["checkpoint"], 0) + 1
        resp = s["response"].replace("\n", " ")[:200]
        lines.append(f"- **{s['checkpoint']}** — _{s['prompt'][:120]}_ (answer {s.get('answer')}) → `{resp}`")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(cfg: ReportConfig, ctx) -> dict:
    """Entry point of stage kind ``report``."""
    run_dir = ctx.recipe.output_dir
    path = write_report(run_dir, Path(ctx.resolve(cfg.eval)), ctx.out_dir, cfg)
    shutil.copy(path, run_dir / "report.md")
    for png in ctx.out_dir.glob("*.png"):
        shutil.copy(png, run_dir / png.name)
    return {"report": str(run_dir / "report.md")}
