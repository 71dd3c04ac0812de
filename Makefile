PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Local cluster: `make up WORKERS=3 GATEWAYS=2 ENGINE=piper` (or the same as environment variables).
WORKERS ?= 2
GATEWAYS ?= 1
ENGINE ?= piper
# `make up MONITOR=1` also starts Prometheus on :9090 and a Redis exporter (Debian's packages,
# installed when missing).
MONITOR ?=
MONITOR_ON := $(filter 1 yes true,$(MONITOR))

.PHONY: venv test lint system-deps up down status logs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	$(VENV)/bin/pip install --quiet --no-deps cosyvoice2-eu==0.2.8
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -rfE

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy contract gateway worker cluster

# Debian's nginx, redis-server and python3-venv, when missing (installs as root; else says how).
system-deps:
	@cluster/system-deps.sh $(if $(MONITOR_ON),prometheus prometheus-redis-exporter)

up: system-deps venv
	$(PY) -m cluster up --workers $(WORKERS) --gateways $(GATEWAYS) --engine $(ENGINE) \
		$(if $(MONITOR_ON),--monitor)

down:
	$(PY) -m cluster down

status:
	$(PY) -m cluster status

logs:
	$(PY) -m cluster logs

# Load tests against the local cluster (`make up`), bounded in time; see docs/loadtest.md.
# `make loadtest LOADTEST_URL=... LOADTEST_DURATION=10s`; `make bench BENCH_ARGS='...'`.
LOADTEST_URL ?= http://127.0.0.1:8080
BENCH_WORKER_URL ?= http://127.0.0.1:9100
BENCH_TARGETS ?= --target label=nginx,url=$(LOADTEST_URL),texts=mix \
	--target label=worker,url=$(BENCH_WORKER_URL),api=worker,texts=mix
BENCH_ARGS ?= --concurrency 1,2,4 --duration 10 --max-requests 200

.PHONY: loadtest bench kubernetes-nginx kubernetes-scan

loadtest:
	LOADTEST_URL=$(LOADTEST_URL) loadtest/wrk/run.sh

bench: venv
	$(PY) -m loadtest.runner $(BENCH_TARGETS) $(BENCH_ARGS)

# Kubernetes (docs/kubernetes.md): nginx's ConfigMap files rendered again from the template,
# and checkov over the rendered overlays.
kubernetes-nginx: venv
	$(PY) -m cluster.kubernetes --write

kubernetes-scan:
	deploy/kubernetes/scan.sh
