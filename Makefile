# Two front doors: `make demo` (set up, then run the demo) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torchvision (and so timm) needs a torch built for it. On these machines without a GPU that pair is
# torch 2.14.1 + torchvision 0.29.1, both on local disk (PyPI's torchvision fails beside the CPU torch 2.13.0);
# with a GPU, any matching pair from the index. Override with `make TORCH='torch==X torchvision==Y' setup`.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.3,<3 torchvision' || echo 'torch==2.14.1 torchvision==0.29.1')

.PHONY: setup demo test gpu-check gpu-wheels clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,vision]'
	touch $@

demo: setup
	$(BIN)/ensemble-kd demo

test: setup
	$(BIN)/python -m pytest -q

# On a GPU machine (see benchmarks/gpu_check.py): every GPU figure in under 8 minutes; CPU_DRY_RUN=1 checks it here.
gpu-check:
	PYTHONPATH=$${PYTHONPATH:+$$PYTHONPATH:}src $(PYTHON) benchmarks/gpu_check.py $(if $(CPU_DRY_RUN),--cpu-dry-run)

gpu-wheels:  # the wheels a bare GPU machine lacks, into .whl/
	sh benchmarks/gpu_wheels.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
