"""The stage kinds a recipe may name: kind -> (config dataclass, entry function).

Plain imports, no plugin registry: adding a stage means adding its module and
one line here. Stage modules import heavy libraries (torch, vLLM) inside their
functions, so importing this table (``posttrain validate``) stays fast.
"""

from __future__ import annotations

from posttrain import evaluate, generate, report, tasks, tiny
from posttrain import dpo, sft
from posttrain import online_dpo
from reward import train as reward_train
from data_synthesis import constitutional, if_feedback, repurpose
from data_synthesis import code_feedback, rejection_sampling
from data_synthesis import annotate_app, evolve, instag, respond, selection

STAGES: dict[str, tuple[type, object]] = {
    "make_tiny_model": (tiny.TinyModelStageConfig, tiny.run_stage),
    "generate": (generate.GenerateConfig, generate.run),
    "instag": (instag.InstagConfig, instag.run),
    "select": (selection.SelectConfig, selection.run),
    "evolve": (evolve.EvolveConfig, evolve.run),
    "respond": (respond.RespondConfig, respond.run),
    "annotation_export": (annotate_app.AnnotationExportConfig, annotate_app.run_export_stage),
    "make_task": (tasks.TaskConfig, tasks.run),
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
