"""The readout and loss math that the CUDA kernels and the C++ CPU references share
(csrc/common/readout_math.h, csrc/common/contrastive_math.h).

Two kinds of check. Numbers: the headers, compiled by the host C++ compiler alone into a small probe
(tests/csrc/shared_math_probe.cpp), against float64 numpy / torch on edge cases, in both accumulator
types: float, the one the kernels instantiate, and double, the CPU references'. (The CPU references
themselves, i.e. the same functions inside engine._C, are checked against torch in
test_reward_readout_cpp.py and test_contrastive_loss_cpp.py.) Structure: both implementations of each
operation include its header and call the same set of its functions, and neither spells a formula of
its own, so a kernel that drifted away from the tested math fails here.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.engine.test_loss import (ATOL32, RTOL32, SEPARATED_MARGINS, U64, assert_near_oracle,
                                    separated_case)

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
PROBE = Path(__file__).with_name("shared_math_probe.cpp")

# header -> (CPU reference, CUDA kernels)
SHARED = {
    "readout_math.h": ("reward_readout.cpp", "cuda/reward_readout.cu"),
    "contrastive_math.h": ("contrastive_loss.cpp", "cuda/contrastive_loss.cu"),
}
# Elementary functions: in the implementations they would mean a formula outside the shared header.
ELEMENTARY = re.compile(
    r"\b(?:std::)?(?:__)?(?:exp2?f?|log1?p?f?|log2f?|r?sqrtf?|fmaf?|fm(?:ax|in)f?|fabsf?|tanhf?|powf?|"
    r"fdividef)\s*\(")


# ---- structure ------------------------------------------------------------------------------------

def _code(path: Path) -> str:
    """Source without comments and string literals."""
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def _header_functions(header: Path) -> set[str]:
    return set(re.findall(r"POLAR_HD\s+[\w:<>]+\s+(\w+)\s*\(", _code(header)))


def _called(source: Path, functions: set[str]) -> set[str]:
    return set(re.findall(r"\b(?:readout|contrastive)::(\w+)\b", _code(source))) & functions


@pytest.mark.parametrize("header", sorted(SHARED))
def test_both_implementations_include_the_header_and_call_the_same_functions(header):
    cpu, cuda = (CSRC / p for p in SHARED[header])
    for source in (cpu, cuda):
        assert f'#include "common/{header}"' in source.read_text(), f"{source.name} does not include {header}"
    functions = _header_functions(CSRC / "common" / header)
    assert len(functions) >= 6, f"no POLAR_HD functions found in {header}: {functions}"
    cpu_calls, cuda_calls = _called(cpu, functions), _called(cuda, functions)
    assert cuda_calls, f"{cuda.name} calls nothing from {header}"
    assert cuda_calls == cpu_calls, (f"only the CUDA kernels call {sorted(cuda_calls - cpu_calls)}, "
                                     f"only the CPU reference {sorted(cpu_calls - cuda_calls)}")
    # every function is used, by both implementations or by another function of the header
    header_code = _code(CSRC / "common" / header)
    unused = [f for f in functions - cpu_calls if len(re.findall(rf"\b{f}\s*[(<]", header_code)) < 2]
    assert not unused, f"functions of {header} that neither implementation runs: {unused}"


@pytest.mark.parametrize("source", [*(CSRC / p for pair in SHARED.values() for p in pair),
                                    *sorted((CSRC / "cuda").glob("*.cuh"))], ids=lambda p: p.name)
def test_no_math_outside_the_shared_headers(source):
    found = [m.group(0) for m in ELEMENTARY.finditer(_code(source))]
    assert not found, f"{source.relative_to(ROOT)} computes {found}: formulas belong in csrc/common"


def test_elementary_pattern_catches_what_it_must():
    # the structural test above is only as good as this pattern
    for call in ("expf(x)", "__expf(x)", "std::exp(x)", "log1pf(e)", "logf(d)", "rsqrtf(s)", "fmaf(a, b, c)",
                 "fmaxf(m, 0.0f)", "fabsf(m)", "std::sqrt(v)", "std::log(s)"):
        assert ELEMENTARY.search(call), call
    for fine in ("hd::exp_like", "to_float(x)", "expand(x)", "logger(x)", "maxwell(x)"):
        assert not ELEMENTARY.search(fine), fine


# ---- numbers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx, "no C++ compiler found (engine._C needs one too)"
    exe = tmp_path_factory.mktemp("probe") / "shared_math_probe"
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(CSRC), str(PROBE), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the shared math headers do not compile without nvcc:\n{proc.stderr[-6000:]}"

    def run(requests: list[str]) -> list[np.ndarray]:
        out = subprocess.run([str(exe)], input="\n".join(requests) + "\n", capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == len(requests)
        return [np.array([float(x) for x in line.split()]) for line in lines]

    return run


def f32(values) -> np.ndarray:
    """The float32 inputs both implementations take, as float64."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def words(values) -> str:
    return " ".join(repr(float(x)) for x in values)  # exact: every float32 is a float64


ACCS = ["float", "double"]
# relative error allowed; absolute errors below float's smallest normal number are underflow, not error
RTOL = {"float": 2e-5, "double": 1e-12}
ATOL = {"float": 1.2e-38, "double": 1e-300}

PAIRS = [  # (r_pos, r_neg)
    (0.0, 0.0), (1.0, 1.0), (1e30, 1e30), (3e38, 3e38),      # ties count 1/2, weight 1/2
    (1.0, 0.0), (0.0, 1.0), (1.0000001, 1.0), (1e-40, 0.0),   # smallest margins (subnormal too)
    (20.0, 0.0), (0.0, 20.0), (88.0, 0.0), (0.0, 88.0),       # exp(88) is near float's largest
    (100.0, 0.0), (0.0, 100.0), (1e4, -1e4), (-1e4, 1e4),
    (1e30, -1e30), (-1e30, 1e30), (-3.5, 2.25),
]


@pytest.mark.parametrize("acc", ACCS)
def test_pair_terms(probe, acc):
    got = probe([f"pair {acc} {words(f32(pair))}" for pair in PAIRS])
    for (rp, rn), (loss, correct, weight) in zip(f32(PAIRS), got):
        m = rp - rn
        assert correct == (1.0 if rp > rn else 0.5 if rp == rn else 0.0), (rp, rn, correct)
        np.testing.assert_allclose(loss, np.logaddexp(0.0, -m), rtol=RTOL[acc], atol=ATOL[acc], err_msg=str((rp, rn)))
        sigmoid_neg = np.exp(-np.logaddexp(0.0, m))
        np.testing.assert_allclose(weight, sigmoid_neg, rtol=RTOL[acc], atol=ATOL[acc], err_msg=str((rp, rn)))


def _infonce_cases():
    rng = np.random.default_rng(0)
    return [  # (r_pos, negatives in merge order)
        (0.0, [0.0]), (0.0, [0.0, 0.0, 0.0]),                    # ties: log(1 + k), weights 1 / (1 + k)
        (0.0, [1e4, -1e4, 0.0]), (0.0, [-1e30, -1e30]), (1e30, [-1e30]), (-100.0, [100.0]),
        (0.0, [88.0, 89.0, 90.0]), (0.0, [90.0, 89.0, 88.0]),    # exp(d) overflows float: the max rescales
        (0.0, list(range(1, 17))), (0.0, list(range(16, 0, -1))),  # rising and falling merge order
        (0.5, list(rng.standard_normal(16) * 50)), (2.0, list(rng.standard_normal(15) * 1e4)),
        (3.0, list(rng.standard_normal(7) * 1e-3 + 3.0)),        # margins near zero
        # a margin of -inf adds nothing, merged before or after a finite one (it made the sum NaN)
        (0.0, [-np.inf, 0.5]), (0.0, [0.5, -np.inf]), (0.0, [-np.inf]), (np.inf, [1.0, 2.0]),
    ]


@pytest.mark.parametrize("acc", ACCS)
def test_infonce_logsumexp(probe, acc):
    cases = _infonce_cases()
    got = probe([f"infonce {acc} {words(f32([rp]))} {len(negs)} {words(f32(negs))}" for rp, negs in cases])
    for (rp, negs), out in zip(cases, got):
        rp, negs = f32([rp])[0], f32(negs)
        d = negs - rp
        loss = np.logaddexp.reduce(np.concatenate([[0.0], d]))
        assert out[0] == 0.0, "a positive with pairs reads as empty"
        np.testing.assert_allclose(out[1], loss, rtol=RTOL[acc], atol=ATOL[acc], err_msg=str((rp, negs)))
        np.testing.assert_allclose(out[2:], np.exp(d - loss), rtol=RTOL[acc], atol=ATOL[acc], err_msg=str((rp, negs)))


@pytest.mark.parametrize("acc", ACCS)
def test_infonce_of_well_separated_groups_keeps_its_relative_precision(probe, acc):
    """The float math is the CUDA kernels' (which cannot run here), the double the CPU references':
    largest margins -100..100 against the fp64 oracle of tests/engine/test_loss.py, to its fp32 bound
    for float and the same 32 ulp for double. Reading the state as log(S exp(M) + 1) where M < 0
    gave 0 below M = -16.6 in float (M ~ -37 in double), 9e-4 relative error at M = -10 in float."""
    rtol, atol = (RTOL32, ATOL32) if acc == "float" else (32 * U64, 0.0)
    cases = [separated_case(m) for m in SEPARATED_MARGINS]
    requests = []
    for rewards, pos, neg, _, _ in cases:
        for p in pos.unique().tolist():
            negs = rewards[neg[pos == p]].numpy()
            requests.append(f"infonce {acc} {words([rewards[p]])} {len(negs)} {words(negs)}")
    got = iter(probe(requests))
    for margin, (rewards, pos, neg, loss, grad) in zip(SEPARATED_MARGINS, cases):
        losses, weights = [], np.zeros(len(rewards))
        for p in pos.unique().tolist():
            out = next(got)
            assert out[0] == 0.0, "a positive with pairs reads as empty"
            losses.append(out[1])
            weights[neg[pos == p].numpy()] = out[2:]
        negatives = neg.numpy()
        assert_near_oracle(np.sum(losses), loss, rtol, atol, f"{acc} loss at margin {margin}")
        assert_near_oracle(weights[negatives], grad[negatives], rtol, atol, f"{acc} weights at margin {margin}")


def test_infonce_positive_without_pairs_reads_as_empty(probe):
    assert [list(x) for x in probe(["infonce float 1.0 0", "infonce double 1.0 0"])] == [[1.0], [1.0]]


def _readout_reference(x, w, v, eps, g):
    """Forward and gradients of r = sum_k x_k rsqrt(mean(x^2) + eps) w_k v_k by float64 autograd."""
    t = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w, v)]
    r = (t[0] * torch.rsqrt(t[0].pow(2).mean() + eps) * t[1] * t[2]).sum()
    r.backward(torch.tensor(g, dtype=torch.float64))
    return r.item(), *(a.grad.numpy() for a in t)


def _readout_cases():
    rng = np.random.default_rng(1)
    cases = []
    for h, scale, eps, g in [
        (1, 3.0, 1e-6, 1.0),        # h = 1: dL/dx is almost all cancellation
        (3, 1.0, 1e-6, -2.0),
        (33, 1.0, 1e-6, 0.7),       # h not a multiple of the kernels' vector width (4 or 8)
        (4101, 1.0, 1e-5, 1.3),
        (64, 1e-20, 1e-6, 1.0),     # tiny activations: eps dominates the norm
        (64, 1e15, 1e-6, 1.0),      # large activations: x^2 near 1e30, still finite in float
        (40, 1.0, 0.0, 1.0),        # eps = 0
        (16, 1.0, 1e-6, 0.0),       # zero upstream gradient: exactly zero gradients
    ]:
        x = rng.standard_normal(h) * scale
        w = 1.0 + 0.1 * rng.standard_normal(h)
        v = rng.standard_normal(h) / np.sqrt(h)
        cases.append((f32(x), f32(w), f32(v), float(np.float32(eps)), float(np.float32(g))))
    return cases


@pytest.mark.parametrize("acc", ACCS)
def test_readout_row(probe, acc):
    cases = _readout_cases()
    got = probe([f"readout {acc} {len(x)} {eps!r} {g!r} {words(x)} {words(w)} {words(v)}"
                 for x, w, v, eps, g in cases])
    for (x, w, v, eps, g), out in zip(cases, got):
        h = len(x)
        r_ref, dx_ref, dw_ref, dv_ref = _readout_reference(x, w, v, eps, g)
        assert out.shape == (1 + 3 * h,)
        r, dx, dw, dv = out[0], out[1:1 + h], out[1 + h:1 + 2 * h], out[1 + 2 * h:]
        if g == 0.0:
            assert not dx.any() and not dw.any() and not dv.any()
        # A sum or difference is only as accurate as its terms: each output's error is measured
        # against the size of the terms it is made of (sum_k |x_k w_k v_k| rstd for r; the two terms
        # of a_k (w v - x c) for dx), as a float GPU kernel's would be.
        rstd = 1.0 / np.sqrt(np.mean(x * x) + eps)
        r_scale = np.sum(np.abs(x * w * v)) * rstd
        dx_scale = abs(g) * rstd * (np.abs(w * v) + np.abs(x) * rstd * r_scale / h)
        tol = RTOL[acc]
        assert abs(r - r_ref) <= tol * r_scale, (h, r, r_ref)
        assert np.all(np.abs(dx - dx_ref) <= tol * dx_scale + ATOL[acc]), (h, np.abs(dx - dx_ref).max())
        np.testing.assert_allclose(dw, dw_ref, rtol=tol, atol=ATOL[acc])
        np.testing.assert_allclose(dv, dv_ref, rtol=tol, atol=ATOL[acc])
