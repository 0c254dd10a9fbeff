# make test: set up a fresh machine (Debian packages, .venv), then lint, type-check and test.
# make run:  a local tracker, three keepers and a mount, state under ./.dfs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEB_PACKAGES := fuse3 libfuse3-dev pkg-config patch rsync git tar openssl chromium systemd python3 postgresql
STAMP := $(VENV)/.installed

.PHONY: test run lint deps venv bench fuzz clean

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml packaging/pyfuse3-3.5.0-dfs.patch packaging/build-pyfuse3.sh
	$(MAKE) deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	packaging/build-pyfuse3.sh $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) lint
	$(BIN)/pytest -x -q --durations=25 tests

run: $(STAMP)
	$(BIN)/python -m cluster.devcluster --state .dfs --mountpoint "$${MOUNTPOINT:-mnt}"

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -q tests/unit/test_fuzz.py

bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .dfs .mypy_cache .ruff_cache
