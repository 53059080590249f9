# The two set-up commands of the README: `make serve` (serve the bundled default model) and
# `make test` (everything CI checks). Both install what they need on a fresh machine, into a
# project-local environment (.venv) from the committed lock files, so nothing the machine's own
# Python holds can leak in.
#
#   requirements/lock-service.txt  the service alone (make serve, the Docker image)
#   requirements/lock-dev.txt      service + train + dev extras (make test, CI)
#
# `make lock` refreshes both after a change to pyproject.toml's dependencies.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# pip-tools, only for `make lock`; pinned so every refresh resolves the same way.
PIP_TOOLS := pip-tools==7.6.2
# pip-compile flags shared by both lock files: no extras markers, no index URLs (they are this
# machine's, not the project's), and the build requirements pinned too (the editable install builds
# with them, without build isolation).
COMPILE := $(VENV)/bin/pip-compile -q --allow-unsafe --all-build-deps --strip-extras --no-emit-index-url \
	--no-emit-find-links

.PHONY: serve test install install-dev system-deps lint lock venv

# A venv whose interpreter runs; recreated when it is missing or broken.
venv:
	@$(PY) -c 'import sys' 2>/dev/null || $(PYTHON) -m venv --clear $(VENV)

# Exact versions from the lock, then the project itself without resolving anything again.
# pip-sync would also remove extras; plain `pip install -r` keeps a dev venv usable for serving.
install: venv
	$(PIP) install -q -r requirements/lock-service.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .

install-dev: venv
	$(PIP) install -q -r requirements/lock-dev.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .

# Debian packages the tests use as real peers: Prometheus + promtool, haproxy (the balancer
# in front of several replicas) and chromium (the browser the page's tests drive). Needs root;
# skipped when they are already present. The
# manifest checks also need kustomize (or kubectl, which embeds it); Debian's kubectl is too old
# (kustomize v2), so that one is only checked for.
SYSTEM_DEPS := promtool:prometheus haproxy:haproxy chromium:chromium
system-deps:
	@missing=""; for dep in $(SYSTEM_DEPS); do \
		command -v "$${dep%%:*}" >/dev/null 2>&1 || missing="$$missing $${dep#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "missing:$$missing (sudo apt-get install$$missing)" >&2; exit 1; fi; \
	fi
	@command -v kustomize >/dev/null 2>&1 || kubectl kustomize --help >/dev/null 2>&1 || { \
		echo "kustomize missing: install kustomize v5 or kubectl >= 1.27" \
			"(https://kubectl.docs.kubernetes.io/installation/kustomize/)" >&2; exit 1; }

serve: install
	$(VENV)/bin/notsure serve

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: system-deps install-dev lint
	$(PY) -m pytest -q

# Re-resolve both lock files from pyproject.toml (the service lock is constrained by the dev
# lock, so the two never pin different versions of the same package). Kept pins stay unless
# pyproject.toml asks otherwise; `make lock UPGRADE=1` moves everything to the newest release.
lock: venv
	$(PIP) install -q $(PIP_TOOLS)
	$(COMPILE) $(if $(UPGRADE),--upgrade) --extra train --extra dev \
		-o requirements/lock-dev.txt pyproject.toml
	$(COMPILE) -c requirements/lock-dev.txt -o requirements/lock-service.txt pyproject.toml
	$(PY) requirements/lockcheck.py --stamp
