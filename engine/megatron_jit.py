"""megatron-core's import-time `torch.compile` decorations compile on first call (GPU) or run eagerly (CPU).

Some megatron modules decorate helpers with `torch.compile` when they are imported (the MoE
router that `megatron.core.pipeline_parallel` pulls in, and every `jit_fuser` helper: fusions,
activations, norms). `torch.compile(fn)` compiles nothing until fn is called, but it imports
torch._dynamo and part of inductor at once: about 3 of the 5-6 seconds `import megatron.core`
takes on a CPU, paid by every process a run, a launcher or a test starts, for helpers the engine
never calls (engine.parallelize turns megatron's fusions off, all but SwiGLU's). While a megatron
module executes, `torch.compile` is a stand-in that returns a wrapper which calls the real
`torch.compile` with the same arguments on its first call with a tensor off the CPU, so on a GPU
what runs is unchanged; only the import of dynamo waits until something compiled is used. Called
with CPU tensors only, the helper runs eagerly: inductor on a CPU builds C++ with the system
compiler, measured at 11.6 s for the first call of megatron's SwiGLU helpers in a fresh process
(2.2 s more when the token count changes, 3.2 s with a warm cache), paid by every training process
of a CPU run or test (the convergence guard's short pre-training run: 38-44 s eager, 114 s compiled
with a cold cache, 66 s warm, on 2 shared cores), for element-wise code that eager torch runs in
milliseconds (benchmarks/swiglu_memory.py). Outside megatron's module bodies `torch.compile` is
torch's own.
"""
from __future__ import annotations

import functools
import importlib.abc
import sys


def _cpu_only(args, kw) -> bool:
    """True when the call has tensor arguments and all of them are on the CPU."""
    import torch

    devices = {a.device.type for a in (*args, *kw.values()) if isinstance(a, torch.Tensor)}
    return devices == {"cpu"}


def _lazy_compile(real):
    def compile_on_first_call(model=None, **kwargs):
        if model is None:  # @torch.compile(...) with settings
            return lambda m: compile_on_first_call(m, **kwargs)
        import torch

        if isinstance(model, torch.nn.Module) or not callable(model):
            return real(model, **kwargs)
        compiled = None

        @functools.wraps(model)
        def first_call_compiles(*args, **kw):
            nonlocal compiled
            if _cpu_only(args, kw):
                return model(*args, **kw)
            if compiled is None:
                compiled = real(model, **kwargs)
            return compiled(*args, **kw)

        return first_call_compiles

    compile_on_first_call.compiles_on_first_call = True
    return compile_on_first_call


class _MegatronImports(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real loader of each megatron module."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "megatron" and not fullname.startswith("megatron."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            import torch

            saved = torch.compile
            if not getattr(saved, "compiles_on_first_call", False):  # not already inside a megatron module
                torch.compile = _lazy_compile(saved)
            try:
                run(module)
            finally:
                torch.compile = saved

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Arms the hook (once); megatron modules imported before it keep what they did."""
    if not any(isinstance(f, _MegatronImports) for f in sys.meta_path):
        sys.meta_path.insert(0, _MegatronImports())
