"""polar::shared_prefix_attention (Triton) against the float64 dense-mask reference, in the interpreter.

TRITON_INTERPRET must be set before the kernel module is imported. The tile schedule is checked
against the dense mask, and skipping is proven by NaN in tiles that must never be visited. The sm_90
compile check runs in a subprocess without the interpreter, started at the first test so it overlaps
the interpreter's work on the second core.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from engine.kernels import shared_prefix_attention as spa  # noqa: E402
from engine.packing import collate  # noqa: E402
from tests.engine.kernels.attention_cases import (  # noqa: E402
    NAMES, poison, random_group, random_layout, reference, rel_err, run, tile_aligned_case,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the kernels are meant to write in full starts as NaN."""
    monkeypatch.setattr(spa, "_empty", lambda shape, device, dtype: torch.full(shape, float("nan"), device=device,
                                                                                dtype=dtype))







def _inputs(seed, layout, hq, hkv, d):
    gen = torch.Generator().manual_seed(seed)
    s, b = layout.shape[-1], layout.shape[0]
    q = torch.randn(s, b, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(s, b, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(s, b, hkv, d, generator=gen, dtype=torch.float64)
    grad = torch.randn(s, b, hq * d, generator=gen, dtype=torch.float64)
    return q, k, v, grad







# (seed, b, groups per row, K range, hq, hkv, d, blocks (fwd_m, fwd_n, bwd_m, bwd_n) or None)
CASES = [
    (0, 2, 3, (2, 5), 2, 2, 64, None),
    (1, 1, 2, (2, 4), 4, 2, 128, None),
    (2, 2, 1, (8, 17), 4, 1, 64, None),             # K up to 16 with 1-token candidates possible
    (3, 3, 2, (2, 4), 4, 1, 128, (32, 16, 16, 32)),  # non-square tiles
    (4, 2, 4, (2, 3), 2, 1, 64, (16, 32, 32, 16)),
]


def _patch_blocks(monkeypatch, blocks):
    if blocks is not None:
        fm, fn, bm, bn = blocks
        monkeypatch.setattr(spa, "_blocks", lambda d, device, dtype: spa._Blocks((fm, fn, 4, bm, bn, 4, 1)))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[f"seed{c[0]}-hq{c[4]}-hkv{c[5]}-d{c[6]}" for c in CASES])
def test_fp32_matches_float64_reference(monkeypatch, case, deterministic):
    seed, b, n_groups, k_range, hq, hkv, d, blocks = case
    _patch_blocks(monkeypatch, blocks)
    layout = random_layout(seed, b, n_groups, k_range, p_max=20, c_max=8)
    if deterministic:  # fewer sizes for the second path: the first covers the shapes
        layout = layout[:1].contiguous()
    q, k, v, grad = _inputs(100 + seed, layout, hq, hkv, d)
    ref = run(reference, q, k, v, grad, layout, torch.float64)
    got = run(spa.shared_prefix_attention, q, k, v, grad, layout, torch.float32, deterministic=deterministic)
    for name, g, r in zip(NAMES, got, ref):
        assert g.shape == r.shape and g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < 2e-5, (name, rel_err(g, r))


def test_exact_fill_padding_only_row_and_empty_prefix():
    rng = np.random.default_rng(9)
    rows = [[random_group(rng, 5, [3, 4]), random_group(rng, 0, [2, 6, 1])], [random_group(rng, 1, [1, 1])]]
    layout = collate(rows, 21, pad_id=0).layout  # row 0 fills all 21 tokens; row 1 is mostly padding
    q, k, v, grad = _inputs(7, layout, 2, 1, 64)
    ref = run(reference, q, k, v, grad, layout, torch.float64)
    got = run(spa.shared_prefix_attention, q, k, v, grad, layout, torch.float32)
    for name, g, r in zip(NAMES, got, ref):
        assert rel_err(g, r) < 2e-5, name


@pytest.mark.parametrize("deterministic", [False, True])
def test_tiny_groups_and_pieces_around_the_tile_size(deterministic):
    """What the random layouts rarely make, with the interpreter's 16-token tiles and 3 query heads per
    KV head: many groups of empty or 1-token prefixes and 1-token candidates (rows that see only
    themselves: their dq and dk are 0); pieces of 15, 16 and 17 tokens; 17 tokens of padding."""
    rng = np.random.default_rng(12)
    tiny = [random_group(rng, 0, [1, 1, 1]), random_group(rng, 1, [1, 1]), random_group(rng, 0, [2, 1]),
            random_group(rng, 1, [1, 1, 1, 1])]
    layouts = [collate([tiny, [random_group(rng, 17, [15, 16, 1])]], 66, pad_id=0).layout,
               collate([[random_group(rng, 15, [17, 16])]], 49, pad_id=0).layout]
    for i, layout in enumerate(layouts):
        q, k, v, grad = _inputs(30 + i, layout, 3, 1, 16)
        ref = run(reference, q, k, v, grad, layout, torch.float64)
        got = run(spa.shared_prefix_attention, q, k, v, grad, layout, torch.float32, deterministic=deterministic)
        for name, g, r in zip(NAMES, got, ref):
            assert rel_err(g, r) < 2e-5, (i, name, rel_err(g, r))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_low_precision_within_twice_torch_error(dtype, d):
    """STYLE 8: the error against float64 at most twice torch's own error in the same dtype (the
    interpreter runs the dots in fp32, so this checks the dtype handling, not tensor-core rounding).
    dq gets three times: delta = do . o uses the output rounded to the input dtype, as FlashAttention
    does (keeping an fp32 output for it would cost memory); in bf16 that alone doubles dq's error."""
    layout = random_layout(20 + d, 2, 2, (2, 4), p_max=16, c_max=8)
    q, k, v, grad = _inputs(d, layout, 4, 2, d)
    ref = run(reference, q, k, v, grad, layout, torch.float64)
    low = run(reference, q, k, v, grad, layout, dtype)
    got = run(spa.shared_prefix_attention, q, k, v, grad, layout, dtype)
    for name, g, t, r in zip(NAMES, got, low, ref):
        assert g.dtype == dtype, name
        assert torch.isfinite(g).all(), name
        e_k, e_t = rel_err(g, r), rel_err(t, r)
        assert e_k <= (3 if name == "dq" else 2) * e_t + 1e-3, (name, e_k, e_t)


# ---- block skipping -----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the poisoned candidate's own rows
@pytest.mark.parametrize("deterministic", [False, True])
def test_never_visited_tiles_can_hold_nan(deterministic):
    """Tile-aligned pieces (16-token tiles): NaN in a sibling candidate's K/V and in another group's
    Q/K/V leaves the other candidates' outputs and gradients finite and exact."""
    layout, sibling, other, rows = tile_aligned_case(np.random.default_rng(11), 16)
    q, k, v, grad = _inputs(5, layout, 2, 1, 64)
    ref = run(reference, q, k, v, grad, layout, torch.float64)
    got = run(spa.shared_prefix_attention, *poison(q, k, v, sibling, other), grad, layout, torch.float32,
              deterministic=deterministic)
    for name, g, r in zip(NAMES, got, ref):
        g, r = g[rows[name]], r[rows[name]]
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < 2e-5, name
    # the poison did land where it should: the poisoned candidate's own output is NaN
    assert torch.isnan(got[0][sibling]).all() and torch.isnan(got[0][other]).all()


# ---- determinism, op registration, model path ---------------------------------------------------

def test_deterministic_backward_is_bit_identical():
    layout = random_layout(40, 2, 2, (2, 5))
    q, k, v, grad = _inputs(41, layout, 4, 1, 64)
    a = run(spa.shared_prefix_attention, q, k, v, grad, layout, torch.float32, deterministic=True)
    b = run(spa.shared_prefix_attention, q, k, v, grad, layout, torch.float32, deterministic=True)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), name


def test_backend_follows_torch_determinism_setting(monkeypatch):
    seen = []
    real = spa.attention_bwd

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(spa, "attention_bwd", spy)
    layout = random_layout(50, 1, 1, (2, 3), p_max=5, c_max=4, pad_max=0)
    q, k, v, grad = _inputs(51, layout, 2, 2, 64)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for flag in (True, False):
            torch.use_deterministic_algorithms(flag)
            run(spa.triton_backend, q, k, v, grad, layout, torch.float32)
    finally:
        torch.use_deterministic_algorithms(was)
    assert seen == [True, False]


def test_opcheck():
    layout = random_layout(60, 1, 1, (2, 3), p_max=6, c_max=4, pad_max=2)
    q, k, v, _ = _inputs(61, layout, 2, 1, 16)
    args = (q.float().requires_grad_(), k.float().requires_grad_(), v.float().requires_grad_(), layout, 0.25, True)
    torch.library.opcheck(torch.ops.polar.shared_prefix_attention.default, args)


def test_views_whose_offsets_pass_32_bits_are_copied_for_the_kernels():
    """megatron's v is a split of the fused QKV output: [s, b, hkv, d] elements, but rows
    (G + 2) * hkv * d apart. With G = 2 at 600k tokens of d = 128 its element count is under 2^31
    and its last offset is not; such a view is copied, a compact one is passed through untouched.
    (On the meta device: no 8 GB allocation.)"""
    s, b, hkv, d, group = 600_000, 1, 8, 128, 2
    fused = torch.empty(s, b, hkv, (group + 2) * d, device="meta")
    v = fused[..., (group + 1) * d:]
    assert v.numel() < 2**31 <= spa._extent(v)
    addressed = spa._unit_last(v)
    assert addressed.is_contiguous() and spa._extent(addressed) == v.numel()
    small = torch.empty(4, 1, 2, (group + 2) * 16)[..., (group + 1) * 16:]
    assert spa._unit_last(small) is small


def test_more_row_head_pairs_than_the_grid_y_dimension_takes_are_refused():
    """The kernels' grids hold one (row, head) pair per y index, at most 65535 in CUDA; beyond that the
    launch failed with a bare CUDA error. (On the meta device: nothing is allocated or launched.)"""
    def check(b, hq):
        q = torch.empty(16, b, hq, 16, device="meta")
        k = torch.empty(16, b, 1, 16, device="meta")
        spa._check(q, k, k, torch.empty(b, 3, 16, dtype=torch.int32, device="meta"))

    check(1, 65535)
    with pytest.raises(ValueError, match="1024 rows x 64 query heads = 65536"):
        check(1024, 64)


def test_layout_on_another_device_than_q_is_refused():
    """The schedule is built on the layout's device and the kernels read it beside q: a CPU layout with
    CUDA tensors failed inside Triton's launcher ('Pointer argument cannot be accessed'). Here the
    layout is on the meta device and q, k, v on the CPU."""
    layout = random_layout(70, 1, 1, (2, 3), p_max=5, c_max=4, pad_max=0)
    q, k, v, _ = _inputs(71, layout, 2, 1, 16)
    with pytest.raises(ValueError, match="must be on one device.*layout meta"):
        spa.attention_fwd(q.float(), k.float(), v.float(), torch.empty_like(layout, device="meta"), 0.25)


def test_backend_registration_is_lazy():
    code = ("import sys; from engine.model import shared_prefix_attention as m; m.get_backend('torch'); "
            "assert 'engine.kernels.shared_prefix_attention' not in sys.modules; "
            "import os; os.environ['TRITON_INTERPRET'] = '0'\n"
            "try:\n    m.get_backend('nope')\n"
            "except ValueError as e:\n    assert 'nope' in str(e) and 'triton' in str(e)\n"
            "else:\n    raise SystemExit('unknown backend accepted')\n"
            "import torch\n"
            "if not torch.cuda.is_available():\n"
            "    try:\n        m.get_backend('triton')\n"
            "    except ValueError as e:\n        assert 'CUDA' in str(e), e\n"
            "    else:\n        raise SystemExit('triton backend accepted without a GPU or the interpreter')\n"
            # called directly, the kernel says so too (before: Triton's driver failed to initialise)
            "    from engine.kernels import shared_prefix_attention as spa\n"
            "    q = torch.zeros(4, 1, 1, 16)\n"
            "    try:\n        spa.attention_fwd(q, q, q, torch.zeros(1, 3, 4, dtype=torch.int32), 0.25)\n"
            "    except ValueError as e:\n        assert 'CUDA tensors' in str(e) and 'TRITON_INTERPRET' in str(e), e\n"
            "    else:\n        raise SystemExit('the kernel ran on CPU tensors without the interpreter')\n"
            "print('ok')")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_reward_model_triton_backend_matches_torch(runtime):
    from engine.config import ModelConfig, ParallelConfig, TrainConfig
    from engine.model.reward_model import RewardModel
    from engine.model.shared_prefix_attention import get_backend
    from engine.model.spec import layer_spec
    from engine.parallelize import transformer_config

    assert get_backend("triton") is spa.triton_backend
    m = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=2, num_query_groups=1,
                    ffn_hidden_size=96, vocab_size=50)
    cfg = transformer_config(m, ParallelConfig(), TrainConfig(precision="fp32"), runtime)
    models = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        models[backend] = RewardModel(cfg, layer_spec(False, 10000.0, backend), m.vocab_size, 512, True, True)
        torch.nn.init.normal_(models[backend].value_head.weight, std=0.5)
    rng = np.random.default_rng(1)
    rows = [[random_group(rng, 9, [4, 6]), random_group(rng, 3, [2, 5, 3])], [random_group(rng, 12, [7, 2])]]
    batch = collate(rows, 40, pad_id=0)
    weights = torch.randn(batch.reward_index.numel(), dtype=torch.float64)
    results = {}
    for backend, model in models.items():
        rewards = model(batch.tokens, batch.layout, batch.reward_index)
        (rewards.double() * weights).sum().backward()
        results[backend] = (rewards.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    assert results["torch"][0].abs().max() > 1e-3
    for name, g in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], g, rtol=1e-4, atol=1e-5, msg=name)


# ---- sm_90 compile check ------------------------------------------------------------------------

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
# (compute capability, opt-in shared memory per block in bytes): what Triton checks at launch
SM90 = (90, spa.SM90_SHARED)
SM86 = (86, 101376)  # sm_86/89 (A10, L4, RTX 30/40): 99 KB
SM100 = (100, 232448)  # sm_100 (B200): 227 KB, as sm_90, but another codegen (tcgen05)


def _strides(*prefixes):
    return {f"{p}_{x}": "i32" for p in prefixes for x in ("s", "b", "h")}


def _variant_specs(dtype, d, target):
    """The kernels the GPU runs for one dtype and head dim on one target, with the tiles `_blocks` picks
    there: fwd, delta, dK/dV (atomic dq and not), dq."""
    p = _PTR[dtype]
    bl = spa._gpu_blocks(d, dtype.itemsize, target[1], target[0] // 10)
    flags = dict(GROUP="constexpr", D="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr", DOT_F32="constexpr",
                 PREC="constexpr")
    common = dict(GROUP=4, D=d, DOT_F32=False, PREC="ieee" if dtype == torch.float32 else "tf32")
    fwd = dict(Q=p, K=p, V=p, O=p, LSE="*fp32", PIECE="*i32", SCHED="*i32", scale_log2="fp32",
               **_strides("sq", "sk", "sv", "so"), L="i32", HQ="i32", n_qt="i32", **flags)
    specs = [("_fwd_kernel", fwd, dict(common, BLOCK_M=bl.fwd_m, BLOCK_N=bl.fwd_n), bl.fwd_warps, bl.stages)]
    delta = dict(O=p, DO=p, DELTA="*fp32", **_strides("so", "sd"), L="i32", HQ="i32", D="constexpr",
                 BLOCK_M="constexpr")
    specs.append(("_bwd_delta_kernel", delta, dict(D=d, BLOCK_M=bl.bwd_m), 4, 1))
    for atomic in (True, False):
        dkdv = dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", DQ="*fp32" if atomic else p, DK=p, DV=p,
                    PIECE="*i32", KSCHED="*i32", scale="fp32", scale_log2="fp32",
                    **_strides("sq", "sk", "sv", "sd", "sdq", "sdk", "sdv"), L="i32", HQ="i32", HKV="i32",
                    n_kt="i32", ATOMIC_DQ="constexpr", **flags)
        specs.append(("_bwd_dkdv_kernel", dkdv, dict(common, BLOCK_M=bl.bwd_m, BLOCK_N=bl.bwd_n,
                                                      ATOMIC_DQ=atomic), bl.bwd_warps, bl.stages))
    dq = dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", DQ=p, PIECE="*i32", SCHED="*i32", scale="fp32",
              scale_log2="fp32", **_strides("sq", "sk", "sv", "sd", "sdq"), L="i32", HQ="i32", n_qt="i32", **flags)
    specs.append(("_bwd_dq_kernel", dq, dict(common, BLOCK_M=bl.bwd_m, BLOCK_N=bl.bwd_n), bl.bwd_warps, bl.stages))
    return [spec + target for spec in specs]


def compile_specs():
    """Every kernel variant the GPU runs in training (fp16/bf16, d 64/128, sm_90) and the ones whose
    shared memory is largest where it is scarcest: fp32 at d = 256 on sm_90, bf16 at d = 256 on sm_86 and on
    sm_100 (whose dK/dV program with the atomic dq asked 263,200 B of 232,448 with the sm_90 tiles)."""
    specs = [s for dtype in (torch.bfloat16, torch.float16) for d in (64, 128) for s in _variant_specs(dtype, d, SM90)]
    return (specs + _variant_specs(torch.float32, 256, SM90) + _variant_specs(torch.bfloat16, 256, SM86)
            + _variant_specs(torch.bfloat16, 256, SM100))


COMPILE_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
module, specs = json.loads(sys.argv[1])
mod = importlib.import_module(module)
for name, sig, consts, warps, stages, arch, shared in specs:
    kernel = getattr(mod, name)
    assert isinstance(kernel, triton.runtime.JITFunction), type(kernel)
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    assert "cubin" in compiled.asm and "ptx" in compiled.asm, name
    # the launch would raise OutOfResources past the device's shared memory
    assert compiled.metadata.shared <= shared, (name, consts, arch, compiled.metadata.shared, shared)
print("compiled", len(specs))
"""


def _start_compile(specs):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", COMPILE_SCRIPT,
                             json.dumps(["engine.kernels.shared_prefix_attention", specs])],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module", autouse=True)
def sm90_compile():
    """Compiles on the second core while the interpreter tests run; the test below collects it."""
    proc = _start_compile(compile_specs())
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _finish(proc, n):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert f"compiled {n}" in out


def test_compiles_for_sm90(sm90_compile):
    _finish(sm90_compile, len(compile_specs()))


def test_compile_check_fails_on_compile_errors():
    """The check is not vacuous: a head dim that is no power of two does not compile."""
    name, sig, consts, warps, stages, arch, shared = compile_specs()[0]
    with pytest.raises(AssertionError):
        _finish(_start_compile([(name, sig, dict(consts, D=100), warps, stages, arch, shared)]), 1)
