"""Evaluation of checkpoints (stage ``eval``, ``posttrain eval``) and the run report (stage ``report``)."""
