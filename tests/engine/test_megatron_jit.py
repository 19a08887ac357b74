"""engine/megatron_jit.py: importing megatron through the engine leaves torch._dynamo unimported
(megatron's import-time torch.compile decorations wait for a first call), torch.compile is torch's
own afterwards, a decorated megatron helper called with CPU tensors runs eagerly (no inductor C++
build per process) and computes as before, and one called with tensors elsewhere is compiled once.
The probes run in a fresh interpreter: sys.modules is the thing measured."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from engine.megatron_jit import _lazy_compile

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, sys
if sys.argv[1] == "engine":
    import engine  # noqa: F401
import torch
import torch.nn.functional as F
import megatron.core, megatron.core.pipeline_parallel  # the schedules import the MoE router's @torch.compile
from megatron.core.activations import squared_relu  # a @jit_fuser helper
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl  # the engine's MLP activation
after_import = "torch._dynamo" in sys.modules
x = torch.linspace(-2, 2, 9)
out = squared_relu(x)
y = torch.randn(3, 2, 8, requires_grad=True)
glu = bias_swiglu_impl(y, None)
glu.sum().backward()
a, b = torch.chunk(y.detach(), 2, -1)
print(json.dumps({"dynamo_at_import": after_import, "compile_is_torchs": torch.compile.__module__ == "torch",
                  "matches_eager": bool(torch.equal(out, torch.relu(x) ** 2)),
                  "swiglu_matches": bool(torch.equal(glu, F.silu(a) * b)) and y.grad is not None,
                  "dynamo_after_call": "torch._dynamo" in sys.modules}))
"""


def probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE, mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_megatron_through_the_engine_runs_its_compiled_helpers_eagerly_on_cpu():
    got = probe("engine")
    assert got == {"dynamo_at_import": False, "compile_is_torchs": True, "matches_eager": True,
                   "swiglu_matches": True, "dynamo_after_call": False}, got


def test_helper_called_off_the_cpu_is_compiled_once():
    """The wrapper megatron's decorations get: `real` stands for torch.compile. Meta tensors stand for a
    GPU's (this machine may have none): anything not on the CPU goes to the compiled helper."""
    compiled_with = []

    def real(fn, **kwargs):
        compiled_with.append(kwargs)
        return lambda *a, **kw: ("compiled", fn(*a, **kw))

    helper = _lazy_compile(real)(dynamic=True)(lambda t, scale=1.0: t * scale)
    cpu = helper(torch.ones(2), scale=torch.tensor(3.0))
    assert torch.equal(cpu, torch.full((2,), 3.0)) and compiled_with == []
    kind, out = helper(torch.ones(2, device="meta"))
    assert kind == "compiled" and out.device.type == "meta" and compiled_with == [{"dynamic": True}]
    assert helper(torch.ones(2, device="meta"), scale=torch.tensor(2.0))[0] == "compiled"
    assert helper(3.0)[0] == "compiled"  # no tensor to place it: compiled as megatron asked
    assert compiled_with == [{"dynamic": True}]


def test_megatron_alone_imports_dynamo_at_import():
    """What the hook saves: without it the same imports bring dynamo in at once."""
    assert probe("plain")["dynamo_at_import"] is True
