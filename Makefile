# Every target sets itself up: a fresh machine needs only Python >= 3.10, gcc and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.ddps-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

.PHONY: bench test demo train install mutate cuda-build-check gpu-compile-check gpu-check clean

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

# Mutation testing of MODULES (paths under ddps/) against the tests of their area (or TESTS), on a
# copy of the checkout in build/mutate (.ci/mutate.py; docs/testing.md).
MUTMUT_SPEC ?= mutmut==3.8.1
mutate: $(STAMP)
	$(PY) -m pip install -q "$(MUTMUT_SPEC)"
	$(PY) .ci/mutate.py $(MODULES) $(if $(TESTS),--tests $(TESTS)) $(if $(ONLY),--only $(ONLY))

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "setuptools>=64" wheel ninja
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install --no-build-isolation -e ".[dev]"
	touch $@

# The CUDA build, compiled and linked without a GPU: ddps._C with its CUDA kernels against the CUDA
# build of the pinned torch (its wheel's headers and libraries; the wheel is downloaded once into
# $(WHEEL_CACHE) and kept there), no unresolved symbols (.ci/cuda_build_check.py).
WHEEL_CACHE ?= $(HOME)/.cache/ddps/wheels
CUDA_TORCH := build/cuda-torch
cuda-build-check: $(STAMP)
	mkdir -p $(WHEEL_CACHE) $(CUDA_TORCH)
	# Another index or a local folder of CPU wheels (pip's configuration here) must not supply it.
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null $(PY) -m pip download -q --no-deps \
	  --only-binary=:all: -d $(WHEEL_CACHE) "$(TORCH_SPEC)"
	wheel=$$(ls -t $(WHEEL_CACHE)/torch-*.whl | grep -v '+cpu' | head -1); \
	if [ "$$(cat $(CUDA_TORCH)/.wheel 2>/dev/null)" != "$$wheel" ]; then \
	  rm -rf $(CUDA_TORCH) && mkdir -p $(CUDA_TORCH) && \
	  unzip -q -o "$$wheel" 'torch/include/*' 'torch/lib/*' torch/version.py -d $(CUDA_TORCH) && \
	  echo "$$wheel" > $(CUDA_TORCH)/.wheel; \
	fi
	$(PY) .ci/cuda_build_check.py --torch $(CUDA_TORCH) --out build/cuda-build-check

# Every Triton kernel compiled for real for sm_80, sm_86 and sm_90, with the Triton that `make
# install` puts in the venv and with the one that the CUDA build of the pinned torch requires
# (installed beside it in build/), against the budgets in ddps/bench/gpu_compile.py; writes
# benchmarks/GPU_COMPILE.md.
TORCH_CUDA_TRITON ?= triton==3.7.1
gpu-compile-check: $(STAMP)
	test -d build/$(subst ==,-,$(TORCH_CUDA_TRITON)) || $(PY) -m pip install -q --no-deps \
	  --target build/$(subst ==,-,$(TORCH_CUDA_TRITON)) "$(TORCH_CUDA_TRITON)"
	env -u TRITON_INTERPRET $(PY) -m ddps.bench.gpu_compile --markdown benchmarks/GPU_COMPILE.md \
	  --triton build/$(subst ==,-,$(TORCH_CUDA_TRITON))

# On a machine with an NVIDIA GPU (a lease): build with CUDA, the whole suite on the GPU,
# compute-sanitizer over the kernel tests, the full benchmark into benchmarks/RESULTS-cuda.md, and
# the run recorded in ddps/gpu_checks.json (.ci/gpu_check.sh). Uses the machine's python3 with
# its torch and triton (GPU_PY=... for another); installs nothing else.
gpu-check:
	bash .ci/gpu_check.sh

clean:
	rm -rf build $(VENV) ddps/_C*.so *.egg-info
