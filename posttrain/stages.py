"""The stage kinds a recipe may name: kind -> (config dataclass, entry function).

Plain imports, no plugin registry: adding a stage means adding its module and
one line here. Stage modules import heavy libraries (torch, vLLM) inside their
functions, so importing this table (``posttrain validate``) stays fast.
"""

from __future__ import annotations

from posttrain import generate, tiny

STAGES: dict[str, tuple[type, object]] = {
    "make_tiny_model": (tiny.TinyModelStageConfig, tiny.run_stage),
    "generate": (generate.GenerateConfig, generate.run),
}
