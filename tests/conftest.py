"""Shared fixtures: which builds of the CPU kernels this machine runs, and a way to force one."""
from pathlib import Path

import pytest
import torch

try:
    from fusedopt._build_info import BUILD
except ImportError:  # not built: the tests say so when they import fusedopt
    BUILD = None


def _cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _supported_isas():
    """DEFAULT always; AVX2 with avx2+fma; AVX512 with avx512f+bw+vl+dq (what csrc/cpu/isa.h requires); only
    those the build has (FUSEDOPT_CPU_ISAS, Note [Sanitizer build] in setup.py)."""
    flags = _cpu_flags()
    isas = ["DEFAULT"]
    if {"avx2", "fma"} <= flags:
        isas.append("AVX2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            isas.append("AVX512")
    built = BUILD.get("cpu_isas", isas) if BUILD else isas
    return [isa for isa in isas if isa in built]


SUPPORTED_ISAS = _supported_isas()


@pytest.fixture(scope="session")
def isas():
    """Every build of the CPU kernels this CPU runs, narrowest first."""
    return list(SUPPORTED_ISAS)


@pytest.fixture
def use_isa(monkeypatch):
    """use_isa(name) forces FUSEDOPT_CPU_ISA (read at every op call) for the rest of the test."""
    def set_isa(name):
        monkeypatch.setenv("FUSEDOPT_CPU_ISA", name)
    yield set_isa


@pytest.fixture(autouse=True)
def _no_isa_leak(monkeypatch):
    """No test sees an ISA forced by the environment or by another test, nor another thread count."""
    monkeypatch.delenv("FUSEDOPT_CPU_ISA", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
