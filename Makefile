.PHONY: deps stack-up stack-down run test lint bench-realtime bench-batch

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

bench-realtime: deps
	eval "$$(scripts/stack up)" && .venv/bin/python -m bench.realtime

bench-batch: deps
	eval "$$(scripts/stack up)" && .venv/bin/python -m bench.batch
