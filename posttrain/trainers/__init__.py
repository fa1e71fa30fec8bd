"""Trainer stages: sft, dpo and online_dpo (each a module with a typed config and one entry point)."""
