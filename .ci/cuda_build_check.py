"""Build ddps._C with its CUDA kernels against the CUDA build of torch, and link it, on a machine
without a GPU: `make cuda-build-check`.

The CUDA wheel of torch cannot be imported here (it needs cuDNN, NCCL and the other CUDA libraries
that it loads at import), so this does what setup.py's CUDAExtension does with explicit paths: the
wheel's headers and libraries (unpacked in --torch), the flags of torch.utils.cpp_extension (the
installed CPU torch of the same version), every csrc/ source, nvcc for the .cu files; then the
shared library is linked against the wheel's libtorch/libc10 (CPU and CUDA) and the toolkit's
cudart, and every symbol it leaves undefined must be defined by a library it names or by the
Python interpreter: no unresolved symbols.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_home() -> str:
    """The toolkit of the nvcc on the PATH (nvcc may be a wrapper script; ask nvcc itself)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    out = subprocess.run(["nvcc", "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True).stderr
    top = re.search(r"TOP=(\S+)", out)
    if top:
        return os.path.normpath(top.group(1))
    return os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))


def run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"FAILED: {' '.join(cmd)}\n{result.stdout}{result.stderr}")
    return result.stdout


def dynamic_symbols(path, defined: bool) -> set:
    flag = "--defined-only" if defined else "--undefined-only"
    out = run(["nm", "-D", flag, path])
    symbols = set()
    for line in out.splitlines():
        parts = line.split()
        if not parts:
            continue
        kind, name = (parts[-2], parts[-1]) if len(parts) >= 2 else ("U", parts[0])
        if not defined and kind == "w":  # weak: may stay unresolved
            continue
        symbols.add(name.split("@")[0])
    return symbols


def needed(path) -> list:
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", run(["readelf", "-d", path]))


def find_library(name, dirs, system: str):
    """The path of a NEEDED library: in ``dirs``, else in the loader's cache (``ldconfig -p``)."""
    for d in dirs:
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    match = re.search(rf"^\s*{re.escape(name)} .*=> (\S+)$", system, re.M)
    return match.group(1) if match else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", required=True, help="the CUDA torch wheel unpacked (holding torch/include, torch/lib)")
    parser.add_argument("--out", required=True, help="build folder")
    parser.add_argument("--arch", default=os.environ.get("DDPS_CUDA_ARCH", "8.0;9.0"),
                        help="compute capabilities, as DDPS_CUDA_ARCH (default 8.0;9.0)")
    args = parser.parse_args()
    from torch.utils import cpp_extension  # the CPU torch of the same version: flags only

    start = time.time()
    torch_dir = os.path.join(os.path.abspath(args.torch), "torch")
    if not os.path.isfile(os.path.join(torch_dir, "version.py")):
        sys.exit(f"--torch {args.torch}: no unpacked torch wheel there (torch/version.py is missing)")
    cuda = cuda_home()
    version = open(os.path.join(torch_dir, "version.py")).read()
    wheel_cuda = re.search(r"cuda: Optional\[str\] = '([\d.]+)'", version)
    if not wheel_cuda or not os.path.exists(os.path.join(torch_dir, "lib", "libtorch_cuda.so")):
        sys.exit(f"{args.torch} holds no CUDA build of torch")
    nvcc_version = re.search(r"release ([\d.]+)", run(["nvcc", "--version"])).group(1)
    if nvcc_version.split(".")[0] != wheel_cuda.group(1).split(".")[0]:
        sys.exit(f"nvcc is CUDA {nvcc_version}, torch was built with CUDA {wheel_cuda.group(1)}")
    includes = [os.path.join(ROOT, "csrc"), os.path.join(torch_dir, "include"),
                os.path.join(torch_dir, "include", "torch", "csrc", "api", "include"),
                os.path.join(cuda, "include"), sysconfig.get_paths()["include"]]
    includes += glob.glob(os.path.join(cuda, "targets", "*", "include"))
    defines = ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DDDPS_WITH_CUDA",
               "-D_GLIBCXX_USE_CXX11_ABI=1"]
    common = [*defines, *(f"-I{i}" for i in includes), "-std=c++20"]
    gencode = []
    for arch in args.arch.replace(",", ";").split(";"):
        cc = arch.replace(".", "")
        gencode += ["-gencode", f"arch=compute_{cc},code=sm_{cc}"]
    os.makedirs(args.out, exist_ok=True)
    jobs = []
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)):
        obj = os.path.join(args.out, os.path.basename(src) + ".o")
        # -O1: this checks that everything compiles and links; `make test` builds and runs -O3.
        jobs.append((obj, ["g++", "-c", src, "-o", obj, "-fPIC", "-O1", "-fopenmp", *common]))
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)):
        obj = os.path.join(args.out, os.path.basename(src) + ".o")
        jobs.append((obj, ["nvcc", "-c", src, "-o", obj, "-O3", "-Xcompiler", "-fPIC", *common,
                           *cpp_extension.COMMON_NVCC_FLAGS, *gencode]))
    # An object newer than every source and header is kept (the check is run again after edits).
    newest = max(os.path.getmtime(f) for f in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True))
    stale = [(obj, cmd) for obj, cmd in jobs if not os.path.exists(obj) or os.path.getmtime(obj) < newest]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for obj, cmd in stale:
            print(" ".join(cmd[:3]), flush=True)
        list(pool.map(lambda job: run(job[1]), stale))
    lib_dirs = [os.path.join(torch_dir, "lib"), *glob.glob(os.path.join(cuda, "targets", "*", "lib")),
                os.path.join(cuda, "lib64")]
    so = os.path.join(args.out, "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    run(["g++", "-shared", "-o", so, *(o for o, _ in jobs), *(f"-L{d}" for d in lib_dirs),
         "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", "-lc10_cuda", "-ltorch_cuda", "-lcudart", "-fopenmp"])
    system = run(["ldconfig", "-p"])
    libs = {lib: find_library(lib, lib_dirs, system) for lib in needed(so)}
    missing = [lib for lib, path in libs.items() if path is None]
    if missing:
        sys.exit(f"{so} needs libraries found nowhere: {missing}")
    provided = set()
    for path in libs.values():
        provided |= dynamic_symbols(path, defined=True)
    provided |= dynamic_symbols(os.path.realpath(sys.executable), defined=True)
    # An interpreter built with --enable-shared exports the C API from libpython, not the executable.
    libpython = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("LDLIBRARY") or "")
    if ".so" in os.path.basename(libpython) and os.path.exists(libpython):
        provided |= dynamic_symbols(libpython, defined=True)
    undefined = sorted(dynamic_symbols(so, defined=False) - provided)
    if undefined:
        sys.exit(f"{so}: {len(undefined)} unresolved symbols, e.g. {undefined[:10]}")
    # The CUDA kernels are in it: one machine-code image per asked architecture.
    import triton  # its wheel carries a cuobjdump, which a bare toolkit may lack
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                                          "bin", "cuobjdump")
    images = run([cuobjdump, "--list-elf", so])
    archs = sorted(set(re.findall(r"\.(sm_\d+)\.", images)))
    wanted = sorted({f"sm_{a.replace('.', '')}" for a in args.arch.replace(",", ";").split(";")})
    if archs != wanted:
        sys.exit(f"{so} holds CUDA machine code for {archs}, expected {wanted}")
    print(f"cuda-build-check: {os.path.basename(so)} built from {len(jobs)} sources and linked against torch "
          f"{re.search(r'__version__ = .(.+?).$', version, re.M).group(1)} (CUDA {wheel_cuda.group(1)}; nvcc "
          f"{nvcc_version}): {len(libs)} libraries needed, all found; no unresolved symbols; CUDA code for "
          f"{', '.join(archs)}; {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
