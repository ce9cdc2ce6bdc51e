"""Build of ddps and its compiled extension ``ddps._C``.

Environment variables (also documented in README.md):
  DDPS_NO_EXTENSION=1   pure-Python install, no ``ddps._C``.
  DDPS_BUILD_CUDA=0|1   force the CUDA sources off / on (default: on when nvcc and a CUDA
                        build of torch are both present).
  DDPS_CUDA_ARCH        TORCH_CUDA_ARCH_LIST for the CUDA build (default "8.0;9.0").
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["ddps", "ddps.app", "ddps.app.cli", "ddps.app.data", "ddps.app.heads", "ddps.app.segmentors", "ddps.bench",
            "ddps.configs", "ddps.nn", "ddps.ops", "ddps.kernels"]
# The Triton kernels live in the top-level kernels/ folder of the repository but are installed
# (wheel and editable alike) as ddps.kernels, never as a top-level `kernels` module.
PACKAGE_DIR = {"ddps": "ddps", "ddps.kernels": "kernels", "ddps.configs": "configs"}


def _flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _extensions():
    if _flag("DDPS_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    force_cuda = _flag("DDPS_BUILD_CUDA")
    cuda_possible = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if force_cuda and not cuda_possible:
        raise SystemExit(
            "DDPS_BUILD_CUDA=1 but the CUDA build is impossible: "
            f"CUDA_HOME={cpp_extension.CUDA_HOME}, torch.version.cuda={torch.version.cuda}"
        )
    with_cuda = cuda_possible if force_cuda is None else force_cuda
    # Portable flags: no -march=native, so a wheel built here runs on any x86-64 / aarch64.
    # -ffp-contract=off: no fused multiply-adds, so float math matches the other backends bitwise
    # (the denoiser kernels that have no such contract and gain from them turn them back on).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("DDPS_CUDA_ARCH", "8.0;9.0"))
        kwargs["extra_compile_args"]["cxx"].append("-DDDPS_WITH_CUDA")
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++20", "-DDDPS_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension("ddps._C", cpu_sources + cuda_sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("ddps._C", cpu_sources, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data={"ddps": ["gpu_checks.json"], "ddps.configs": ["*.yaml"]}, ext_modules=ext_modules, cmdclass=cmdclass)
