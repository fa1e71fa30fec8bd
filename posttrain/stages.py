"""The stage table (composition root): kind -> (config dataclass, entry function).

Plain imports, no plugin registry: adding a stage means adding its module and one line here.
The recipe parser never imports this module; the CLI (and tests) pass ``STAGES`` into
``Recipe.load``, through ``load_recipe`` / ``recipe_from_dict`` below. Stage modules import
heavy libraries (torch, vLLM) inside their functions, so importing this table
(``posttrain validate``) stays fast.
"""

from __future__ import annotations

from pathlib import Path

from data_synthesis import (annotate as annotate_app, code_feedback, constitutional, evolve, generate, if_feedback,
                            instag, make_task, rejection_sampling, repurpose, respond, selection)
from posttrain.core import import_model, tiny
from posttrain.core.recipe import Recipe, StageTable
from posttrain.evaluation import evaluate, report
from posttrain.trainers import dpo, online_dpo, sft
from reward import train as reward_train

STAGES: StageTable = {
    "make_tiny_model": (tiny.TinyModelStageConfig, tiny.run_stage),
    "import_model": (import_model.ImportModelConfig, import_model.run),
    "generate": (generate.GenerateConfig, generate.run),
    "instag": (instag.InstagConfig, instag.run),
    "select": (selection.SelectConfig, selection.run),
    "evolve": (evolve.EvolveConfig, evolve.run),
    "respond": (respond.RespondConfig, respond.run),
    "annotation_export": (annotate_app.AnnotationExportConfig, annotate_app.run_export_stage),
    "make_task": (make_task.TaskConfig, make_task.run),
    "eval": (evaluate.EvalConfig, evaluate.run),
    "report": (report.ReportConfig, report.run),
    "sft": (sft.SFTStageConfig, sft.run),
    "dpo": (dpo.DPOStageConfig, dpo.run),
    "online_dpo": (online_dpo.OnlineDPOConfig, online_dpo.run),
    "reward": (reward_train.RewardStageConfig, reward_train.run),
    "repurpose": (repurpose.RepurposeConfig, repurpose.run),
    "constitutional": (constitutional.ConstitutionalConfig, constitutional.run),
    "if_feedback": (if_feedback.IFFeedbackConfig, if_feedback.run),
    "rejection_sampling": (rejection_sampling.RejectionSamplingConfig, rejection_sampling.run),
    "code_feedback": (code_feedback.CodeFeedbackConfig, code_feedback.run),
}


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_models: bool = True) -> Recipe:
    """``Recipe.load`` with the full stage table."""
    return Recipe.load(path, STAGES, overrides, check_models)


def recipe_from_dict(data: dict, path: str | Path = "recipe.yaml", check_models: bool = True) -> Recipe:
    """``Recipe.from_dict`` with the full stage table."""
    return Recipe.from_dict(data, Path(path), STAGES, check_models)
