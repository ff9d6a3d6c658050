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
#   make demo-full DEMO_ARGS="data.root=data/demo144 data.list_dir=data/demo144 data.crop_size=144"
# (its set is made at data.crop_size pixels; 144 px: an 18 x 18 affinity grid, every target of #15
# in five runs of five, 37-41 minutes on the EPYC below; add train.amp=auto for bfloat16
# where the CPU has it: 29.7 minutes, every target in two runs of four; README, "The demos").
demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch/run_demo.sh $(DEMO_ARGS)

# All of AFA's training, the affinity branch included (README, "The demos"): about 23 minutes on
# 2 AMD EPYC cores with AVX-512 (22.4 measured), 61.5 on 2 without (measured at radius 3).
demo-full: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DEMO_CONFIG=configs/demo_full.yaml bash launch/run_demo.sh \
		$(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info
