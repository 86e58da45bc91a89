"""A parameter of more than 2^31 elements: the CPU op indexes with 64 bits (every element past 2^31 gets its own
update, none wraps onto another) and makes no float32 copy of the tensors. Needs ~9 GiB of free memory: it is
skipped, saying so, where /proc/meminfo shows less."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedopt

ROOT = Path(__file__).resolve().parent.parent
N = 2**31 + 2**20 + 3
# p[i] = i mod 61, g[i] = (7i + 3) mod 53: small whole numbers, so p - 0.5·g is exact in bf16 (the expected
# values need no rounding rule), and with the odd period 61·53 no element's value equals that of the element
# 2^31 (or 2^32) before or after it, so a wrapped index shows.
PERIOD = 61 * 53
BLOCK = PERIOD * 2**12  # ~13.3M elements: the fill and the check go block by block
LR = 0.5
NEEDED_GIB = 2 * N * 2 / 2**30 + 1.5  # p and g in bf16, plus the interpreter, torch and one block at a time


def _pattern(n):
    i = torch.arange(n, dtype=torch.int64)
    return (i % 61).to(torch.bfloat16), ((7 * i + 3) % 53).to(torch.bfloat16)


def _blocks(n):
    for start in range(0, n, BLOCK):
        yield start, min(BLOCK, n - start)


def run_child():
    """In a fresh process (so that its peak RSS is this test's): fill, step, check every element; print JSON."""
    import resource
    import time

    base_p, base_g = _pattern(BLOCK)
    expected = (base_p.float() - LR * base_g.float()).to(torch.bfloat16)
    assert torch.equal(expected.float(), base_p.float() - LR * base_g.float())  # exact: no rounding involved
    p, g = torch.empty(N, dtype=torch.bfloat16), torch.empty(N, dtype=torch.bfloat16)
    for start, n in _blocks(N):
        p[start:start + n].copy_(base_p[:n])
        g[start:start + n].copy_(base_g[:n])
    p.grad = g
    opt = fusedopt.SGD([p], lr=LR)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start_time = time.perf_counter()
    opt.step()
    seconds = time.perf_counter() - start_time
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bits = [t.view(torch.int16) for t in (p, g, expected, base_g)]  # bitwise, and faster than bf16 compares
    bad = [start for start, n in _blocks(N) if not (torch.equal(bits[0][start:start + n], bits[2][:n])
                                                    and torch.equal(bits[1][start:start + n], bits[3][:n]))]
    # Spot checks against the formula, by index, at the edges.
    spots = [0, 1, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**31 + 2**20, N - 2, N - 1]
    formula = {i: float(i % 61) - LR * float((7 * i + 3) % 53) for i in spots}
    print(json.dumps(dict(bad_blocks=bad, spots={i: [p[i].item(), formula[i]] for i in spots},
                          step=opt.state[p]["step"].item(), step_seconds=seconds, rss_before=rss_before,
                          rss_after=rss_after)))


def _available_gib():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


@pytest.mark.slow
def test_more_than_2_31_elements_bf16_sgd():
    available = _available_gib()
    if available < NEEDED_GIB:
        pytest.skip(f"needs {NEEDED_GIB:.1f} GiB of available memory, /proc/meminfo has {available:.1f} GiB")
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_large; test_large.run_child()"
    package_root = str(Path(fusedopt.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bad_blocks"] == [], f"wrong updates in the blocks starting at {result['bad_blocks'][:10]}"
    for i, (got, want) in result["spots"].items():
        assert got == want, f"element {i}: {got}, the formula gives {want}"
    assert result["step"] == 1
    # No float32 (or other) copy of p or g: the step adds well under one bf16 tensor (4 GiB) to the peak.
    grown = (result["rss_after"] - result["rss_before"]) / 2**30
    assert grown < 0.5, f"the step raised the peak RSS by {grown:.2f} GiB"
    print(f"step of {N} bf16 elements: {result['step_seconds']:.2f} s, peak RSS {result['rss_after'] / 2**30:.2f} GiB")
