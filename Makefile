# Two commands on a fresh machine:
#   make demo   set everything up and run the demo
#   make test   set everything up and run the test suite
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTHON  ?= python3
FUZZ_STAMP := $(VENV)/.fuzz-stamp
FUZZ_SECONDS ?= 60

.PHONY: demo test deps system-deps lint bench compat screenshots fuzz clean

system-deps:
	@./scripts/system-deps.sh

$(STAMP): pyproject.toml proxies/postgres/_speedups.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

deps: system-deps $(STAMP)

demo: deps
	$(VENV)/bin/keyturn demo

test: deps
	$(PY) -m pytest -q -p no:cacheprovider

lint: deps
	$(VENV)/bin/ruff check keyturn proxies portal bots tests bench scripts fuzz
	$(VENV)/bin/mypy keyturn proxies portal bots
	$(VENV)/bin/lint-imports --no-logo --no-cache

bench: deps
	@./scripts/system-deps.sh pgbouncer
	$(PY) bench/pgbench_compare.py

# psycopg 3's own test suite through the gateway and directly, compared (not part of
# `make test`; takes several minutes). Its tests/ come from PSYCOPG_SOURCE (a psycopg
# source tree, git repository or tarball) or, failing that, PyPI / Debian sources.
compat: deps
	$(PY) bench/psycopg_compat.py $(COMPAT_ARGS)

# The README's screenshots, taken from `keyturn demo` itself (Debian's chromium).
screenshots: deps
	$(PY) scripts/demo_screenshots.py

# Coverage-guided fuzzing of the compiled code (proxies/postgres/_speedups.c) against its
# Python twins, with AddressSanitizer and UBSan (see "Fuzzing the compiled code" in
# docs/design-choices.md): builds a sanitized copy of the extension in build/fuzz/ with
# clang (installed when missing), then runs each target for FUZZ_SECONDS.
$(FUZZ_STAMP): pyproject.toml
	$(PY) -m pip install -q -e '.[test,fuzz]'
	@touch $(FUZZ_STAMP)

fuzz: deps $(FUZZ_STAMP)
	./fuzz/build.sh $(PY)
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) .demo .pytest_cache build/fuzz
