# The two commands of the README. Both set up .venv themselves on a fresh machine.
.PHONY: setup demo test

setup:
	bash scripts/setup_env.sh

demo: setup
	.venv/bin/posttrain run recipes/demo/cpu.yaml

test: setup
	.venv/bin/lint-imports
	.venv/bin/python -m pytest -q
