"""Experiment tracking shared by every trainer: TensorBoard event files and (optional) Weights & Biases runs.

Input: a stage's ``train.report_to`` list (``tensorboard``, ``wandb``) and its ``StageContext``
(the recipe, the stage spec, the stage folder ``OUT/<stage>``). Output:

* ``check_reporters``: a one-line error, at recipe load, when ``report_to`` names a tracker whose
  package is missing (W&B is the ``wandb`` extra: ``pip install 'qwen2-posttrain[wandb]'``);
* ``hf_callbacks``: the TrainerCallbacks of the HF/TRL trainers (sft, dpo, reward): TensorBoard
  writing to ``OUT/<stage>/tensorboard``, and HF's ``WandbCallback`` logging into a W&B run this
  module started (``start_wandb``); ``finish_wandb`` ends that run after the stage's last log;
* ``Tracker`` / ``open_tracker``: one scalar logger for hand-written loops (online DPO) that writes
  to both back-ends;
* ``run_identity``: what a stage's W&B run is called. Every stage of one ``posttrain run`` gets the
  same **name** (``WANDB_NAME``, else ``<output folder>-<start time of the run's first tracked
  stage>``), the stage name as its **group** and the stage kind as its **job type**, so the stages of
  one recipe run share a name and each stage's runs across recipe runs share a group. The W&B
  **config** holds the whole resolved recipe (``config.recipe``) plus ``run``, ``stage`` and ``kind``.
  The project is ``WANDB_PROJECT`` or ``qwen2-posttrain``.

Files: W&B writes under ``OUT/<stage>/wandb`` (never under ``checkpoints/``, which
``keep_checkpoints: false`` deletes). ``WANDB_MODE=offline`` keeps everything local (``wandb sync
OUT/<stage>/wandb/offline-run-*`` uploads it later). Only the main rank tracks.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.core.distributed import is_main_process
from posttrain.core.errors import ConfigError

log = logging.getLogger("posttrain")

WANDB_INSTALL = "pip install 'qwen2-posttrain[wandb]'"
WANDB_MISSING = f"report_to: wandb needs the wandb package, which is not installed: {WANDB_INSTALL}"
DEFAULT_PROJECT = "qwen2-posttrain"

# The start stamp of each recipe run (keyed by the Recipe object, which one `posttrain run` shares across
# its stages), so every stage of that run gets the same W&B name; weak, so tests' recipes do not pile up.
_RUN_STARTS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
# The W&B run this module started and has not finished yet (None when none).
_ACTIVE: dict[str, Any] = {"run": None}


# ---------------------------------------------------------------- availability

def wandb_available() -> bool:
    """True when the ``wandb`` package can be imported (without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):  # a broken or half-removed install counts as missing
        return False


def check_reporters(report_to: list[str]) -> None:
    """Raise ValueError (one line) when ``report_to`` names a tracker whose package is not installed."""
    if "wandb" in report_to and not wandb_available():
        raise ValueError(WANDB_MISSING)


def import_wandb() -> Any:
    """The ``wandb`` module, or a one-line ConfigError saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(WANDB_MISSING) from None
    return wandb


# ---------------------------------------------------------------- identity of a stage's W&B run

@dataclass
class RunIdentity:
    """Name, group, job type, folder and config of one stage's W&B run (see the module docstring)."""

    project: str
    name: str
    group: str
    job_type: str
    dir: Path
    config: dict = field(default_factory=dict)


def recipe_run_name(recipe: Any) -> str:
    """The W&B name shared by every stage of one recipe run: ``WANDB_NAME``, else ``<output folder>-<start>``."""
    if os.environ.get("WANDB_NAME"):
        return os.environ["WANDB_NAME"]
    stamp = _RUN_STARTS.setdefault(recipe, time.strftime("%Y%m%d-%H%M%S"))
    return f"{Path(recipe.file.output_dir).name}-{stamp}"


def run_identity(ctx: Any) -> RunIdentity:
    """The W&B identity of the stage ``ctx`` runs: same name across the recipe run, the stage as group."""
    recipe, spec = ctx.recipe, ctx.spec
    name = recipe_run_name(recipe)
    config = {"recipe": recipe.resolved_dict(), "run": name, "stage": spec.name, "kind": spec.kind}
    return RunIdentity(project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=name, group=spec.name,
                       job_type=spec.kind, dir=Path(ctx.out_dir), config=config)


def start_wandb(ident: RunIdentity) -> Any:
    """Start the stage's W&B run (files under ``ident.dir/wandb``); a run this process left open is finished first."""
    wandb = import_wandb()
    if wandb.run is not None:
        # A stage that failed earlier in this process left its run open; without this, wandb.init would
        # hand that run back and this stage would log into the wrong group.
        wandb.run.finish()
    (ident.dir / "wandb").mkdir(parents=True, exist_ok=True)  # wandb.init(dir=D) writes into D/wandb
    run = wandb.init(project=ident.project, name=ident.name, group=ident.group, job_type=ident.job_type,
                     dir=str(ident.dir), config=ident.config)
    _ACTIVE["run"] = run
    log.info("W&B run %s (group %s) in %s", ident.name, ident.group, ident.dir / "wandb")
    return run


def finish_wandb() -> None:
    """Finish the W&B run ``start_wandb`` started (no-op when none is open)."""
    run, _ACTIVE["run"] = _ACTIVE["run"], None
    if run is not None:
        run.finish()


# ---------------------------------------------------------------- TensorBoard

def tensorboard_writer(out_dir: Path) -> Any:
    """A SummaryWriter on ``out_dir/tensorboard`` on the main rank, else None."""
    if not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))


# ---------------------------------------------------------------- HF / TRL trainers

def hf_callbacks(report_to: list[str], ctx: Any) -> list:
    """TrainerCallbacks for ``report_to`` on the main rank ([] elsewhere); starts the stage's W&B run.

    The trainers pass ``report_to="none"`` to transformers and get these instead: HF's own
    TensorBoard callback would write under ``checkpoints/``, and its W&B callback would start a run
    in the ``huggingface`` project with none of the names above. Given a started run, HF's
    ``WandbCallback`` logs into it (``train/loss``, ``train/learning_rate``, ...) and adds the
    TrainingArguments to its config. Call ``finish_wandb`` after the stage's last log.
    """
    if not is_main_process():
        return []
    out: list = []
    if "tensorboard" in report_to:
        from transformers.integrations import TensorBoardCallback

        out.append(TensorBoardCallback(tb_writer=tensorboard_writer(Path(ctx.out_dir))))
    if "wandb" in report_to:
        start_wandb(run_identity(ctx))
        from transformers.integrations import WandbCallback

        out.append(WandbCallback())
    return out


# ---------------------------------------------------------------- hand-written loops

class Tracker:
    """Scalars of a hand-written loop into TensorBoard (``OUT/<stage>/tensorboard``) and/or the stage's W&B run."""

    def __init__(self, report_to: list[str], ctx: Any):
        self.tb = tensorboard_writer(Path(ctx.out_dir)) if "tensorboard" in report_to else None
        self.wandb = start_wandb(run_identity(ctx)) if "wandb" in report_to else None

    def log_scalars(self, values: dict[str, Any], step: int, prefix: str = "") -> None:
        """Log the numeric entries of ``values`` (others are skipped) at ``step``, names prefixed by ``prefix``."""
        nums = {f"{prefix}{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()  # a crash must not lose the episodes already run
        if self.wandb is not None:
            self.wandb.log(nums, step=step)

    def close(self) -> None:
        """Close the TensorBoard writer and finish the W&B run."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb = None
            finish_wandb()


def open_tracker(report_to: list[str], ctx: Any) -> Tracker | None:
    """A ``Tracker`` for the stage on the main rank when ``report_to`` names any tracker, else None."""
    if not report_to or not is_main_process():
        return None
    return Tracker(report_to, ctx)
