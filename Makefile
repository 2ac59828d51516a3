# Everything a fresh clone needs: `make run` and `make test` set up .venv and node_modules.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run stop test unit integration lint mypy protos check-generated breaking bench clean stubs

setup: $(STAMP) $(BUF)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(BUF): package.json package-lock.json
	npm install --silent --no-audit --no-fund
	touch $(BUF)

protos: setup
	$(PY) scripts/gen_protos.py
	$(BUF) format -w

check-generated: setup
	$(PY) scripts/gen_protos.py --check

lint: setup
	$(BUF) lint
	$(BUF) format --diff --exit-code

# FILE-level breaking-change check of the protos against the main branch.
breaking: setup
	@if git rev-parse --verify -q main >/dev/null; then \
	  $(BUF) breaking --against '.git#branch=main'; \
	else echo "no main branch yet: nothing to compare against"; fi

mypy: setup
	$(VENV)/bin/mypy

test: setup lint check-generated breaking mypy
	$(PY) -m pytest -q

unit: setup
	$(PY) -m pytest -q tests/unit

integration: setup
	$(PY) -m pytest -q tests/integration

run: setup
	bash scripts/run_demo.sh

stop:
	bash scripts/stop_demo.sh

# Go and TypeScript/ES stubs of gpufleet.v1 into clients/go and clients/ts/gen (not
# committed; see buf.gen.yaml). The Go plugins are Debian packages, installed here when
# missing and running as root; protoc-gen-es comes with `npm install` (setup).
GO_PLUGINS := protoc-gen-go protoc-gen-go-grpc
stubs: setup
	@missing=$$(for p in $(GO_PLUGINS); do command -v $$p >/dev/null || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(GO_PLUGINS) >/dev/null; \
	  else \
	    echo "make stubs needs $$missing: sudo apt-get install $(GO_PLUGINS)" >&2; exit 1; \
	  fi; \
	fi
	$(BUF) generate

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) node_modules .mypy_cache .pytest_cache .gpufleet
