# Every target sets itself up: a fresh machine needs only Python >= 3.10, gcc and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.ddps-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

.PHONY: bench test demo train install nvcc-check clean

# The main job: ddps against the original implementation on this machine (quick profile).
bench: $(STAMP)
	$(PY) -m ddps bench

# The DDPS sampling loop on random features with every available backend.
demo: $(STAMP)
	$(PY) -m ddps demo

# The synthetic demo: a segmentor and a DDPS head trained on synthetic-shapes, then evaluated
# (runs/synthetic/eval.json; --resume continues an interrupted run).
train: $(STAMP)
	$(PY) -m ddps train --out runs/synthetic $(if $(wildcard runs/synthetic/checkpoints),--resume)

# The whole test suite (Triton kernels run on the CPU through the Triton interpreter).
# pytest's exit code 5 (no test collected) is a failure here, not a pass.
test: $(STAMP)
	$(PY) -m pytest tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "setuptools>=64" wheel ninja
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install --no-build-isolation -e ".[dev]"
	touch $@

# Compile-only check of every CUDA source (sm_80 and sm_90), for machines without a GPU. A CPU
# build of torch ships no c10/cuda/impl/cuda_cmake_macros.h (CMake generates it for CUDA builds),
# so the check supplies its one-line content. Flags as torch's own CUDA extension build uses.
NVCC ?= nvcc
NVCC_SHIM := build/nvcc-shim
nvcc-check: $(STAMP)
	mkdir -p $(NVCC_SHIM)/c10/cuda/impl build/nvcc-check
	echo '#define C10_CUDA_BUILD_SHARED_LIBS' > $(NVCC_SHIM)/c10/cuda/impl/cuda_cmake_macros.h
	set -e; flags="$$($(PY) -c "import sysconfig, torch.utils.cpp_extension as c; print(' '.join(c.COMMON_NVCC_FLAGS + ['-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]]))")"; \
	for f in $$(find csrc -name '*.cu'); do \
	  echo "nvcc -c $$f"; \
	  $(NVCC) -std=c++20 -O3 -c $$f -o build/nvcc-check/$$(basename $$f).o -Icsrc -I$(NVCC_SHIM) $$flags -DDDPS_WITH_CUDA \
	    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90; \
	done

clean:
	rm -rf build $(VENV) ddps/_C*.so *.egg-info
