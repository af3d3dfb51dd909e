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

.PHONY: demo test test-fast install redis faketime chromium slurm xvfb bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the machine's CPU build; any other version pulls gigabytes of CUDA packages
	$(BIN)/pip install -q torch==2.13.0
	# constraints.txt pins one consistent set of every dependency (pip alone backtracks for an hour over s3fs/botocore)
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
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

# the wizard and dashboard tests drive Debian's Chromium through Playwright (its own browser download is not used)
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) \
	  || (echo "chromium is needed by the browser tests: apt-get install -y chromium chromium-driver" && exit 1)

# the Slurm provider's tests start a one-node slurmctld + slurmd (and munged) on this machine
slurm:
	@command -v slurmctld >/dev/null || [ -x /usr/sbin/slurmctld ] || (apt-get update -qq && apt-get install -y -qq slurm-wlm munge) \
	  || (echo "Slurm is needed by the provider tests: apt-get install -y slurm-wlm munge" && exit 1)

# the napari test draws a real napari window on an Xvfb display with Mesa's OpenGL (Qt's xcb platform needs the libxcb-*)
xvfb:
	@command -v Xvfb >/dev/null && ldconfig -p | grep -q libxcb-cursor.so.0 && ldconfig -p | grep -q libxcb-icccm.so.4 \
	  && ldconfig -p | grep -q libxcb-keysyms.so.1 || (apt-get update -qq && apt-get install -y -qq xvfb libgl1-mesa-dri \
	  libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-randr0 libxcb-render-util0 libxcb-shape0 \
	  libxcb-xkb1 libxkbcommon-x11-0) \
	  || (echo "Xvfb is needed by the napari test: apt-get install -y xvfb libgl1-mesa-dri libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1" && exit 1)

# Two workers: most system tests wait on subprocesses, servers and browsers, so two share the two cores well;
# the slowest tests are listed at the end (--durations). A test that failed is run again (twice at most): the
# system tests kill processes and servers and wait on them with bounds, and a machine busier than planned can
# overrun one; a breakage fails every run. Tests that passed only on a rerun are listed ("RERUN", -rR).
WORKERS ?= 2
RERUNS ?= 2

test: $(BIN)/.installed redis faketime chromium slurm xvfb
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist worksteal --reruns $(RERUNS) --reruns-delay 5 -rfER --durations=25

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests/unit

bench: $(BIN)/.installed
	$(BIN)/python bench/train_overhead.py

clean:
	rm -rf $(VENV) $(OUT) build dist *.egg-info
