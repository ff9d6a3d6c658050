# One-command set-up: `make demo` and `make test` create .venv on first use and install the
# project into it; the stamp file makes the second run install nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-full test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) requirements.txt requirements-dev.txt setup.py
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# DEMO_ARGS: config overrides for either demo, e.g.
#   make demo-full DEMO_ARGS="train.amp=auto"
# (bfloat16 where the CPU has it: 29.7 minutes, every target of #15 in two runs of four), or
#   make demo-full DEMO_ARGS="data.root=data/demo data.list_dir=data/demo data.crop_size=128"
# (the set is made at data.crop_size pixels; 128 px: 22.4 minutes, every target in six runs of
# nine; README, "The demos").
demo: $(STAMP)
	$(PY) tools/run_demo.py $(DEMO_ARGS)

# All of AFA's training, the affinity branch included, on 144-px images (README, "The demos"):
# 33.7 minutes on 2 AMD EPYC cores with AVX-512 (37-41 on slower mornings), every target of
# #15 in six float32 runs of eight.
demo-full: $(STAMP)
	DEMO_CONFIG=configs/demo_full.yaml $(PY) tools/run_demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info
