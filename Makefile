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
#   make demo-full DEMO_ARGS="seed=1 train.amp=none"
# (another training seed, float32 throughout), or
#   make demo-full DEMO_ARGS="data.root=data/demo160 data.list_dir=data/demo160 data.crop_size=160"
# (a set made at data.crop_size pixels; docs/demo.md).
demo: $(STAMP)
	$(PY) tools/run_demo.py $(DEMO_ARGS)

# All of AFA's training, the affinity branch included, on 144-px images (docs/demo.md): every
# demo target in each of five runs of today's recipe, 29.4-31.2 minutes on 2 AMD EPYC Zen 4 cores
# in bfloat16 (train.amp=auto; float32 where the CPU lacks bfloat16 instructions, slower).
demo-full: $(STAMP)
	DEMO_CONFIG=configs/demo_full.yaml $(PY) tools/run_demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The tests not marked slow (tests/conftest.py, SLOW: every test of 3 s or more, such as training
# runs, torchrun and signal tests, the demo end to end, and the larger optional photo set): 441 of
# 491 tests, 2.6 minutes on 2 CPU cores shared with other work, where the whole suite took 11.3.
.PHONY: test-quick
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# launch/slurm_voc.sh against a real one-node SLURM cluster (tests/test_slurm_cluster.py). As root:
# launch/slurm_local_cluster.sh installs slurm-wlm and munge with apt-get when missing and starts
# the cluster under SLURM_DIR (a start that fails stops make with the reason); the cluster is
# stopped afterwards, whatever the tests' outcome (also one that was already running there).
# --basetemp: the jobs' files stay put while other pytest sessions clean their temporary dirs.
SLURM_DIR ?= /tmp/afa-slurm
.PHONY: test-slurm
test-slurm: $(STAMP)
	bash launch/slurm_local_cluster.sh start $(SLURM_DIR)
	SLURM_CONF=$(SLURM_DIR)/etc/slurm.conf AFA_SLURM_TESTS=1 $(PY) -m pytest -q -m slurm \
		--basetemp=$(SLURM_DIR)/pytest tests/test_slurm_cluster.py; \
	status=$$?; bash launch/slurm_local_cluster.sh stop $(SLURM_DIR); exit $$status

clean:
	rm -rf $(VENV) *.egg-info
