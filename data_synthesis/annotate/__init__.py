"""Human ranking of sampled responses: a web app and the export of its annotations.

Input: the ``tasks.jsonl`` of stage ``respond`` (an instruction with several responses each).
Output: an SQLite database of rankings (``store``), served to annotators by ``server`` (the page
is ``page.html``), and exported by ``export`` (stage ``annotation_export``) to demonstrations,
preferences and agreement statistics (``agreement``). ``cli`` adds ``posttrain annotate``.

Only ``export`` and ``cli`` are imported here; the server (Starlette, uvicorn) is imported by
``posttrain annotate serve`` alone.
"""

from data_synthesis.annotate.cli import add_cli
from data_synthesis.annotate.export import AnnotationExportConfig, export, run_export_stage

__all__ = ["AnnotationExportConfig", "add_cli", "export", "run_export_stage"]
