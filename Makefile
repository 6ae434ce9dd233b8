# Two entry points for a fresh machine: `make demo` and `make test` (both set up first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch's CPU wheel lies in pip's find-links folder; uv does not read pip's configuration.
FIND_LINKS := $(shell python3 -m pip config get global.find-links 2>/dev/null)
UV_LINKS   := $(if $(FIND_LINKS),--find-links $(FIND_LINKS),)
TORCH      ?= torch==2.13.0
APT_PKGS   := xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxkbcommon-x11-0 \
              libxcb-image0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-randr0 \
              libegl1 libgl1 libglib2.0-0 libfontconfig1 libdbus-1-3

.PHONY: setup sysdeps demo test test-fast benchmark baselines train-more ship clean

setup: $(VENV)/.installed

# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (this machine, many containers) nothing else
# writes .pyc files, and every process would compile torch from source: importing the core took
# 8.7 s instead of 2.9 s on a 2-core EPYC (Zen 3).
$(VENV)/.installed: pyproject.toml
	python3 -m pip install -q uv
	python3 -m uv venv -q --allow-existing $(VENV) --python python3
	python3 -m uv pip install -q --compile-bytecode --python $(PY) $(UV_LINKS) "$(TORCH)" -e ".[testing]"
	touch $@

# Xvfb and the X libraries Qt6 needs, for the GUI tests (root on CI; skipped if present).
sysdeps:
	@command -v Xvfb >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(APT_PKGS); }

demo: setup
	$(VENV)/bin/consistent-seg demo

test: setup sysdeps
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not gui"

# docs/benchmarks.md and the shipped cards' "benchmark" scores, from the val splits.
benchmark: setup
	$(PY) benchmarks/accuracy.py --update-cards

# Train (or resume) every baseline to the shipped model's iteration count (MINUTES each at most).
BASELINES := sup-7 sup-3 sup-70 icl-3 ct-only mr-only joint
baselines: setup
	$(PY) benchmarks/accuracy.py --train $(BASELINES) --max-minutes $(MINUTES)

# Continue the shipped models' training from the committed checkpoints (resumable; MINUTES each).
# cardiac-cine-mri finished its 8,000-iteration schedule on a GPU; its optimizer state is not kept.
MINUTES ?= 120
SHIPPED := cardiac-cine-mri abdomen-ct-mri
RESUMABLE := abdomen-ct-mri
train-more: setup
	for m in $(RESUMABLE); do \
	  $(VENV)/bin/consistent-seg train configs/$$m.yaml --run-dir checkpoints/$$m --resume --max-minutes $(MINUTES) || exit 1; \
	done

# Copy each run's best-on-val model into the package (the shipped weights).
ship:
	for m in $(SHIPPED); do \
	  rm -rf src/napari_consistent_seg/models/weights/$$m && \
	  cp -r checkpoints/$$m/best src/napari_consistent_seg/models/weights/$$m || exit 1; \
	done

clean:
	rm -rf $(VENV) build dist src/*.egg-info
