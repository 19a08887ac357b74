"""engine/megatron_jit.py: importing megatron through the engine leaves torch._dynamo unimported
(megatron's import-time torch.compile decorations wait for a first call), torch.compile is torch's
own afterwards, and a decorated megatron helper compiles and computes as before when called.
Each case runs in a fresh interpreter: sys.modules is the thing measured."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, sys
if sys.argv[1] == "engine":
    import engine  # noqa: F401
import torch
import megatron.core, megatron.core.pipeline_parallel  # the schedules import the MoE router's @torch.compile
from megatron.core.activations import squared_relu  # a @jit_fuser helper
after_import = "torch._dynamo" in sys.modules
x = torch.linspace(-2, 2, 9)
out = squared_relu(x)
print(json.dumps({"dynamo_at_import": after_import, "compile_is_torchs": torch.compile.__module__ == "torch",
                  "matches_eager": bool(torch.equal(out, torch.relu(x) ** 2)),
                  "dynamo_after_call": "torch._dynamo" in sys.modules}))
"""


def probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE, mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_megatron_through_the_engine_defers_dynamo_until_a_compiled_helper_runs():
    got = probe("engine")
    assert got == {"dynamo_at_import": False, "compile_is_torchs": True, "matches_eager": True,
                   "dynamo_after_call": True}, got


def test_megatron_alone_imports_dynamo_at_import():
    """What the hook saves: without it the same imports bring dynamo in at once."""
    assert probe("plain")["dynamo_at_import"] is True
