"""Optional adapter: run lm-evaluation-harness tasks on a checkpoint (benchmark ``lm_eval`` of stage ``eval``).

Input: a ``BenchmarkConfig`` with ``name: lm_eval`` (``tasks``, ``limit``, ``model_args``,
``apply_chat_template``, ``include_path``) and the checkpoint folder. Output: flat metrics
``lm_eval/TASK/METRIC,FILTER`` for the eval row (standard errors left out) and
``<details_dir>/lm_eval.json`` with lm-eval's full ``results`` and task configs.

lm-eval's built-in tasks load their data sets from the Hugging Face hub (or its local cache); tasks
of your own (``include_path``: a folder of lm-eval task YAMLs, e.g. ``dataset_path: json`` over a
local file) run offline. Where the hub
cannot be reached, the tasks are built *before* the model is loaded and the failure becomes one
``BadInput`` line that names the tasks and points to the offline benchmarks. The model is lm-eval's
own ``hf`` backend with ``pretrained`` = the checkpoint; it does not use the recipe's sampler.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any

from posttrain.core.errors import BadInput

_OFFLINE_HINT = ("lm-eval tasks need the Hugging Face hub (or its cache); offline, use the benchmarks "
                 "humaneval, gsm_symbolic, ifeval_gen, or mbpp / gsm8k / math / ifeval with data: FILE")


def prepare(spec: Any, resolve: Any = lambda x: x) -> Any:
    """Check the task names and build the tasks (which fetches their data); return lm-eval's TaskManager.

    Called before any model is loaded, so an unknown task or an unreachable hub costs seconds.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise BadInput("benchmark lm_eval needs the package lm-eval (pip install 'qwen2-posttrain[eval]')") from None
    manager = TaskManager(include_path=resolve(spec.include_path) if spec.include_path else None)
    known = set(manager.all_tasks)
    for t in spec.tasks:
        if t not in known:
            near = difflib.get_close_matches(t, sorted(known), n=1)
            raise BadInput(f"benchmark lm_eval: unknown task {t!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    try:
        manager.load(list(spec.tasks))
    except Exception as e:  # noqa: BLE001 - datasets/huggingface_hub raise many kinds for "unreachable"
        if not _is_unreachable(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"benchmark lm_eval: data for task(s) {', '.join(spec.tasks)} could not be loaded "
                       f"({type(e).__name__}: {first[:200]}); {_OFFLINE_HINT}") from None
    return manager


def run_lm_eval(spec: Any, model_path: str, details_dir: Path | None = None, manager: Any = None) -> dict[str, Any]:
    """Run ``spec.tasks`` with lm-eval on ``model_path``; return ``{"lm_eval/TASK/METRIC": value}``."""
    manager = manager or prepare(spec)
    import lm_eval

    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": model_path, **spec.model_args},
                                  tasks=list(spec.tasks), limit=spec.limit, task_manager=manager,
                                  apply_chat_template=spec.apply_chat_template, log_samples=False)
    results = (out or {}).get("results", {})
    if details_dir is not None:
        details_dir.mkdir(parents=True, exist_ok=True)
        (details_dir / "lm_eval.json").write_text(json.dumps({"results": results, "configs": out.get("configs", {})},
                                                             indent=1, default=str))
    return flatten(results)


def flatten(results: dict[str, dict]) -> dict[str, float]:
    """lm-eval's ``{task: {"exact_match,strict-match": v, ...}}`` as ``lm_eval/task/metric`` floats."""
    row = {}
    for task, metrics in results.items():
        for name, v in metrics.items():
            # metric keys read "metric,filter"; others (alias, sample_len) and standard errors are left out
            if "," not in name or "_stderr" in name or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                continue
            row[f"lm_eval/{task}/{name}"] = float(v)
    return row


def _is_unreachable(e: BaseException) -> bool:
    """Whether an exception from loading task data means "the hub (or the network) is not there"."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError",
                "HfHubHTTPError", "TimeoutError", "DataFilesNotFoundError"}:
        return True
    text = str(e)
    return any(s in text for s in ("Couldn't reach", "offline mode", "HF_HUB_OFFLINE", "Name or service not known"))
