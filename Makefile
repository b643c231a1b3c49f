# `make demo`, `make test` and `make docs` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-digits fortunes lm lm-quick test test-all test-default-xla docs bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,demo,docs]"
	touch $(STAMP)

FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# The CPU-sized reproduction on Fashion-MNIST (Debian's dataset-fashion-mnist, installed here when
# running as root); without it, the digits demo (scikit-learn's embedded dataset).
demo: $(STAMP)
	@test -f $(FMNIST) || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } || true
	@if test -f $(FMNIST); then \
		$(PY) experiments/reproduce.py --preset mlpnet-fashion-mnist --quick; \
	else \
		echo "Fashion-MNIST is not installed (as root: apt-get install -y dataset-fashion-mnist); running the digits demo"; \
		$(PY) experiments/demo.py; \
	fi

demo-digits: $(STAMP)
	$(PY) experiments/demo.py

FORTUNES := /usr/share/games/fortunes/songs-poems

# The language-model preset: a byte-level GPT trained on Debian's fortunes (installed here when
# running as root; a failed install warns), its held-out perplexity and bits per byte
# (docs/language-models.md). lm: 5 seeds of 1,000 steps (one took 778 s on a shared 2-core machine);
# lm-quick: 1 seed, 200 steps.
fortunes:
	@test -f $(FORTUNES) || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes; } || \
		echo "warning: could not install fortunes (as root: apt-get install -y fortunes)" >&2

lm: $(STAMP) fortunes
	$(PY) experiments/reproduce.py --preset lm-fortunes

lm-quick: $(STAMP) fortunes
	$(PY) experiments/reproduce.py --preset lm-fortunes --quick

# `make test` (CI) leaves out the tests marked slow (the full-size end-to-end runs); each has a
# smaller version in the default run. `make test-all` runs every test.
# pytest-xdist: TEST_WORKERS processes (default 2, the CI machine's cores); --dist loadfile keeps each
# test file in one worker, so its module fixtures and jit caches are built once. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST) -m "not slow"

test-all: $(STAMP)
	$(PYTEST)

# The solver, transport, gradient, sharding and prune tests compiled with XLA's default options, the
# ones users get (the suite otherwise adds two compile-time options of its own: tests/conftest.py).
DEFAULT_XLA_TESTS := tests/test_iht.py tests/test_methods.py tests/test_transport.py tests/test_gradients.py \
	tests/test_sharding.py tests/test_prune.py
test-default-xla: $(STAMP)
	SWAPJAX_XLA_DEFAULTS=1 $(PYTEST) -m "not slow" $(DEFAULT_XLA_TESTS)

# The API reference site (mkdocs-material + mkdocstrings) in site/; --strict fails on any warning.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) experiments/bench/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site build dist
