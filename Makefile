# onecard — the two commands are `make run` and `make test`; everything else is a step they take.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(shell find protos -name '*.proto')

.PHONY: run test bench chaos gen lint-protos venv lock clean help image chromium

help:
	@echo "make run    start PostgreSQL, NATS, every service and the gateway; seed a demo campus"
	@echo "make test   set up everything and run the whole test suite"
	@echo "make bench  run the benchmarks; writes bench/out/summary.json"
	@echo "make chaos  a seeded lunch rush under faults, then an audit of the money (SEED=<n> reruns one)"
	@echo "make image  build the service image and check it runs read-only as non-root (podman)"

# The environment: one virtualenv, pinned by requirements.lock; the repo root and the generated
# code are put on its path by a .pth file instead of an install step.
$(VENV)/.stamp: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -c 'import site,sys; open(site.getsitepackages()[0] + "/onecard-dev.pth", "w").write("$(CURDIR)\n$(CURDIR)/gen\n$(CURDIR)/sdk/python\n")'
	touch $@

venv: $(VENV)/.stamp

# Generated gRPC/protobuf code lands in gen/ (not committed, never edited by hand).
gen/.stamp: $(VENV)/.stamp $(PROTOS)
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	find gen -type d -exec touch {}/__init__.py \;
	rm -f gen/__init__.py
	touch $@

gen: gen/.stamp

lint-protos: $(VENV)/.stamp
	cd protos && ../$(VENV)/bin/buf lint

run: gen
	$(PY) -m devstack run

# The suite spread over pytest-xdist workers, two per core (a test spends much of its time waiting
# on its servers, so two per core finish sooner than one): each worker is a test session of its own,
# with its own PostgreSQL, NATS servers, test CA and ports (tests/conftest.py). TEST_WORKERS=0 runs
# it serially in this one process. pytest's exit code is make's: 5 (no tests ran) fails too.
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(2 * (os.cpu_count() or 1))')
TEST_DIST ?= load
# The validators of the operators' CRD kinds (cert-manager, CloudNativePG) the manifest tests run
# with Node: tests/deploy/crds/README.md.
CRDS := tests/deploy/crds
$(CRDS)/node_modules/.stamp: $(CRDS)/package-lock.json
	@command -v npm >/dev/null || { echo "make test needs Node.js and npm (Debian: apt-get install nodejs npm)"; exit 1; }
	cd $(CRDS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The browser tests (tests/browser) drive Debian's Chromium with Playwright for Python, whose own
# browser download cannot be reached here: `playwright install` is never run. Installed when missing.
CHROMIUM := /usr/bin/chromium
$(VENV)/.chromium.stamp: | $(VENV)/.stamp
	@if [ ! -x $(CHROMIUM) ]; then \
	  echo "make test: $(CHROMIUM) is missing; installing Debian's chromium (apt-get update, apt-get install -y chromium)"; \
	  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; } \
	    || { echo "make test: installing chromium FAILED (are you root, and can apt reach Debian's mirror?); the browser tests cannot run" >&2; exit 1; }; \
	fi
	@test -x $(CHROMIUM) || { echo "make test: $(CHROMIUM) is still missing after apt-get install chromium" >&2; exit 1; }
	touch $@

chromium: $(VENV)/.chromium.stamp

test: gen lint-protos $(CRDS)/node_modules/.stamp $(VENV)/.chromium.stamp
	$(PY) -m pytest -n $(TEST_WORKERS) --dist $(TEST_DIST)

# The bench starts its children (services, pgbench) while its own TLS channels are open; each child
# execs at once, so gRPC's fork handlers have nothing to do, and with them on gRPC logs a line at
# every start.
bench: gen
	GRPC_ENABLE_FORK_SUPPORT=false $(PY) -m bench

# A seeded lunch rush on the real services under kills, pauses, NATS and PostgreSQL restarts and a
# delaying, dropping proxy; an audit at the end (docs/chaos.md). A random seed unless SEED= is given;
# a failing run prints the line that reruns it.
SEED ?=
chaos: gen
	GRPC_ENABLE_FORK_SUPPORT=false $(PY) -m chaos $(if $(SEED),--seed $(SEED))

# The service image (deploy/Dockerfile), built with podman, buildah or docker and then run read-only
# as its own user and checked: docs/operators.md "Building the image". Not part of `make test`.
image: gen
	deploy/build-image.sh

lock:
	$(PY) -m pip install --quiet -r requirements.in
	$(PY) -m pip freeze --exclude-editable > requirements.lock

clean:
	rm -rf gen $(VENV) bench/out
