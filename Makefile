.PHONY: deps stack-up stack-down run test lint bench-realtime bench-batch

# Not PYTHON: scripts/bootstrap reads that from the environment to name the interpreter that builds .venv.
VENV_PYTHON = .venv/bin/python

deps:
	scripts/bootstrap

stack-up: deps
	scripts/stack up

stack-down:
	scripts/stack down

# The main job: stack + one worker in the foreground.
run:
	scripts/run

# The test command (what CI runs): deps + stack + lint + pytest.
test:
	scripts/test

lint:
	.venv/bin/ruff check .

# `exports=$$(...)` fails when `stack up` does, where `eval "$$(scripts/stack up)"` would succeed on the
# empty output and run the bench against no stack. VENV_PYTHON is overridable (tests check the recipe stops).
bench-realtime: deps
	exports=$$(scripts/stack up) && eval "$$exports" && $(VENV_PYTHON) -m bench.realtime

bench-batch: deps
	exports=$$(scripts/stack up) && eval "$$exports" && $(VENV_PYTHON) -m bench.batch
