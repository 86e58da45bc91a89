"""Builds fusedopt._C: the CPU kernels (once per ISA) and, where a CUDA build of
torch and a CUDA toolkit exist, the CUDA kernels. See DESIGN.md §2."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"

# Note [Per-ISA CPU kernels]
# at::vec::Vectorized is AVX2/AVX512 code only in a translation unit compiled
# with that ISA's flags and CPU_CAPABILITY macros; without them it silently
# falls back to generic code. csrc/cpu/kernels/*.cpp are therefore compiled
# three times, each into its own namespace, and csrc/cpu/ops.cpp picks one at
# run time. setuptools cannot give one source three flag sets, so these objects
# are built by a small ninja file and linked in as extra objects.
ISAS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mbmi2"],
}
# -fopenmp: at::parallel_for is an inline OpenMP region; without the flag it
# silently runs on one thread. -Wno-psabi: gcc notes, for every lambda taking a
# 32/64-byte vector, an ABI change of GCC 4.6 that concerns no caller here.
CXX_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-fast-math", "-fopenmp", "-Wno-psabi"]

# Note [Sanitizer build]
# FUSEDOPT_SANITIZE=1 (scripts/sanitize_check.sh builds so in a copy of the
# tree) compiles and links with ASan and UBSan; -fno-sanitize-recover makes
# every UB report abort, so a test cannot pass over one. -O1 -g1 (line tables)
# as ASan advises: readable reports and a build far shorter than -O3 -g.
# FUSEDOPT_CPU_ISAS=DEFAULT[,AVX2][,AVX512] builds only those ISAs' kernels
# (to keep that build short); each one left out is defined away as
# FUSEDOPT_WITHOUT_<ISA> and csrc/cpu/isa.h never picks it.
SANITIZE = os.environ.get("FUSEDOPT_SANITIZE") == "1"
if SANITIZE:
    CXX_FLAGS = ["-O1", "-g1"] + CXX_FLAGS[1:] + [
        "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
_wanted = os.environ.get("FUSEDOPT_CPU_ISAS", ",".join(ISAS)).split(",")
if "DEFAULT" not in _wanted or not set(_wanted) <= set(ISAS):
    sys.exit(f"FUSEDOPT_CPU_ISAS must list DEFAULT and only {', '.join(ISAS)}; got {','.join(_wanted)}")
CXX_FLAGS += [f"-DFUSEDOPT_WITHOUT_{isa}" for isa in ISAS if isa not in _wanted]
ISAS = {isa: flags for isa, flags in ISAS.items() if isa in _wanted}


# FUSEDOPT_GRIDEMU=0 leaves out the optimizers' grid-emulation ops
# (csrc/cpu/gridemu.cpp, tests only: every CUDA optimizer body compiled again
# for the CPU, the build's longest file); benchmarks/gpu_check.sh builds so,
# as the GPU tests do not use them.
GRIDEMU = os.environ.get("FUSEDOPT_GRIDEMU", "1") != "0"


def want_cuda():
    forced = os.environ.get("FUSEDOPT_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def isa_objects(build_dir: Path):
    build_dir.mkdir(parents=True, exist_ok=True)
    includes = [CSRC / "include", CSRC / "cpu"] + [Path(p) for p in cpp_extension.include_paths()]
    includes.append(Path(sysconfig.get_paths()["include"]))
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    common = " ".join(CXX_FLAGS + ["-fPIC", abi] + [f"-I{p}" for p in includes])
    lines = [
        f"cxx = {os.environ.get('CXX', 'c++')}",
        f"flags = {common}",
        "rule cc",
        "  command = $cxx -MMD -MF $out.d $flags $isa -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $out",
    ]
    objects = []
    for src in sorted((CSRC / "cpu" / "kernels").glob("*.cpp")):
        for isa, flags in ISAS.items():
            obj = build_dir / f"{src.stem}.{isa}.o"
            defs = f"-DCPU_CAPABILITY={isa} -DCPU_CAPABILITY_{isa}"
            lines += [f"build {obj}: cc {src}", f"  isa = {' '.join(flags)} {defs}"]
            objects.append(str(obj))
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
    subprocess.check_call(["ninja", "-C", str(build_dir), "-j", jobs])
    return objects


class Build(cpp_extension.BuildExtension):
    def build_extensions(self):
        objects = isa_objects((Path(self.build_temp) / "isa").resolve())
        # setuptools relinks only when a listed source is newer than the library: the ISA objects and the
        # headers count too (ninja then recompiles only what changed).
        headers = [str(p) for ext in ("h", "cuh") for p in CSRC.rglob(f"*.{ext}")]
        for ext in self.extensions:
            ext.extra_objects = list(ext.extra_objects or []) + objects
            ext.depends = list(ext.depends or []) + objects + headers
        super().build_extensions()


def write_build_info(cuda: bool):
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "cpu_isas": list(ISAS),
        "gridemu": GRIDEMU,
        "sanitize": SANITIZE,
    }
    (ROOT / "fusedopt" / "_build_info.py").write_text(
        '"""Written by setup.py: what this build of fusedopt._C was compiled against."""\n'
        f"BUILD = {info!r}\n"
    )


def extension():
    cuda = want_cuda()
    write_build_info(cuda)
    sources = ["csrc/module.cpp", "csrc/registration.cpp", "csrc/autograd.cpp", "csrc/cpu/ops.cpp",
               "csrc/cpu/dropout_ops.cpp"] + ["csrc/cpu/gridemu.cpp"] * GRIDEMU
    include_dirs = [str(CSRC / "include"), str(CSRC / "cpu")]
    cxx = CXX_FLAGS + ["-DFUSEDOPT_CPU_ONLY"] * (not cuda)
    extra_link = ["-fopenmp"] + ["-fsanitize=address,undefined"] * SANITIZE
    if not cuda:
        return cpp_extension.CppExtension(
            "fusedopt._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=extra_link)
    # sm_80 and sm_90 machine code, and sm_90 PTX, which the driver compiles on first load for any newer GPU
    # (Blackwell: sm_100, sm_120) rather than failing every launch with "no kernel image is available".
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cuda").glob("*.cu"))]
    # --warn-on-spills: a kernel that spills registers says so in the build log, which
    # scripts/cuda_build_check.sh fails on (Note [Register budget] in csrc/include/fusedopt/mta.h).
    nvcc = ["-O3", "-std=c++20", "--fmad=false", "-prec-div=true", "-prec-sqrt=true",
            "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=--warn-on-spills"]
    return cpp_extension.CUDAExtension(
        "fusedopt._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=extra_link)


setup(
    name="fusedopt",
    version="0.1.0",
    packages=find_packages(include=["fusedopt", "fusedopt.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["fusedopt-bench=fusedopt.bench:main"]},
    python_requires=">=3.10",
)
