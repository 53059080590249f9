# The two set-up commands of the README: `make serve` (serve the bundled default model) and
# `make test` (everything CI checks). Both install what they need on a fresh machine.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: serve test install install-dev system-deps lint

install:
	$(PIP) install -q -e .

install-dev:
	$(PIP) install -q -e ".[train,dev]"

# Debian packages the tests use as real peers (Prometheus + promtool). Needs root; skipped
# when they are already present.
system-deps:
	@if ! command -v promtool >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
		else echo "promtool missing: sudo apt-get install prometheus" >&2; exit 1; fi; \
	fi

serve: install
	notsure serve

lint:
	ruff check .
	ruff format --check .
	mypy

test: system-deps install-dev lint
	$(PYTHON) -m pytest -q
