# Two entry points, each installing what it needs first (Debian packages, .venv, the project):
#   make demo   prepare Fashion-MNIST, run every experiment at demo scale, render reports/index.html
#   make test   run the whole test suite
# A second run skips every install step that is already done.

VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SYSTEM_PACKAGES := python3-venv python3-dev pkg-config g++ libopencv-dev libturbojpeg0-dev dataset-fashion-mnist
TEST_PACKAGES   := chromium slurm-wlm munge

.PHONY: demo test install system-packages test-packages bench clean-venv

demo: $(STAMP)
	$(BIN)/repro prepare-data fashion-mnist --out data/fashion-mnist
	$(BIN)/repro run all --scale demo
	$(BIN)/repro report --out reports/index.html

test: $(STAMP) test-packages
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating that as a failure" >&2; exit 1; fi; \
	exit $$rc

bench: $(STAMP)
	$(BIN)/repro bench --out benchmarks/RESULTS.md

install: $(STAMP)

system-packages:
	@scripts/ensure-debian-packages $(SYSTEM_PACKAGES)

test-packages:
	@scripts/ensure-debian-packages $(TEST_PACKAGES)

# torch and torchvision are pinned and installed first: an unpinned torch would pull a multi-GB build.
# FFCV compiles against the system OpenCV, so it is built without pip's cache.
$(STAMP): pyproject.toml | system-packages
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q Pillow numpy
	$(BIN)/python -m pip install -q --no-cache-dir ffcv==1.0.2
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -c "import ffcv, torch, torchvision, repro"
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
