# Two commands do all the set-up on a fresh Debian machine with Python 3.11:
#   make demo   — virtual environment, install, train on ISBI strokes, predict, print IoU
#   make test   — the same environment plus redis-server and libfaketime, then the whole test suite (what .ci/run calls)
# and for a quick check while editing:
#   make test-fast — the unit tests (tests/unit: in-process, no servers, no training), under a minute
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/data/isbi2012-em
OUT    ?= out

.PHONY: demo test test-fast install redis faketime bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the machine's CPU build; any other version pulls gigabytes of CUDA packages
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	mkdir -p $(OUT)
	$(BIN)/dlorch segment $(DATA)/isbi2012_train.npz:image --labels $(DATA)/isbi2012_sparse_strokes.npz:labels -o $(OUT)/isbi2012_segmentation.tif
	@echo "Scored on held-out slices 5-29 (dense labels; training saw strokes on slices 0-4 only):"
	$(BIN)/dlorch evaluate $(OUT)/isbi2012_segmentation.tif $(DATA)/isbi2012_train.npz:labels --slices 5:30
	@echo "Segmentation written to $(OUT)/isbi2012_segmentation.tif (TIFF, opens in Fiji and napari)"

redis:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server) \
	  || (echo "redis-server is needed by the tests: apt-get install -y redis-server" && exit 1)

# libfaketime runs a test client with its clock an hour ahead (leadership must not compare clocks across hosts)
faketime:
	@ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq faketime) \
	  || (echo "libfaketime is needed by the tests: apt-get install -y faketime" && exit 1)

test: $(BIN)/.installed redis faketime
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests/unit

bench: $(BIN)/.installed
	$(BIN)/python bench/train_overhead.py

clean:
	rm -rf $(VENV) $(OUT) build dist *.egg-info
