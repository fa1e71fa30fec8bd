# The commands of the README. Each sets up .venv itself on a fresh machine.
.PHONY: setup demo demo-tiny demo-spread test

setup:
	bash scripts/setup_env.sh

# the main job: SmolLM2-135M-Instruct (real pretrained model, offline) through the whole pipeline
demo: setup
	.venv/bin/posttrain run recipes/demo/smollm2.yaml

# the fast variant (~2 min): a tiny randomly initialised Qwen2 on one-step problems, for quick checks
demo-tiny: setup
	.venv/bin/posttrain run recipes/demo/tiny.yaml

# how far seeds move the fast variant's numbers (3 runs)
demo-spread: setup
	.venv/bin/python scripts/demo_spread.py --seeds 0 1 2

test: setup
	.venv/bin/lint-imports
	.venv/bin/python -m pytest -q
