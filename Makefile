# tsmd-ray: `make train` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# Omniglot for the default run and the tests: $TSMD_DATA_ROOT if set, else the shared copy
# beside this checkout when there is one (else `train` downloads it through torchvision).
TSMD_DATA_ROOT ?= $(wildcard $(abspath ../shared/data/omniglot))
TSMD_OMNIGLOT ?= $(TSMD_DATA_ROOT)
export TSMD_DATA_ROOT TSMD_OMNIGLOT
PYTEST_ARGS ?= --durations=25   # make test lists the slowest tests (the suite aims at < 15 min)

.PHONY: setup train test bench clean
setup:
	@scripts/bootstrap.sh $(VENV)

# The paper's pipeline sized to the machine (tsmd_ray.pipeline: configs/laptop.yaml without a GPU,
# configs/gpu.yaml with one): pre-train the teacher, meta-train TSMD, meta-test. make train ARGS="..."
train: setup
	@$(PY) -m tsmd_ray.pipeline $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/scaling.py

clean:
	rm -rf runs .pytest_cache
