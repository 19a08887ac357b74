"""Start-up decisions for the backbone implementation and FP8: what runs where, refused early.

`model.transformer_impl`: `local` (megatron's own layers, any device) unless `transformer_engine`
is asked for; TE is never picked because it happens to import. `train.fp8`:
  - local: `tensorwise` / `rowwise` current scaling in the linear layers (engine/model/fp8_linear.py);
    `delayed` and `mxfp8` are Transformer Engine recipes and are refused.
  - transformer_engine: megatron's own FP8 settings (TransformerConfig.fp8 / fp8_recipe), which
    wrap each layer in TE's FP8 autocast: `tensorwise` (Float8CurrentScaling), `delayed`
    (DelayedScaling, amax history), `mxfp8` (MXFP8BlockScaling, Blackwell); TE has no per-row recipe.
FP8 tensor cores need compute capability 8.9 (Ada) or 9.0 (Hopper) for per-tensor scales; torch's
row-wise scaled matmul needs 9.0; MXFP8 needs 10.0 (Blackwell).
"""
from __future__ import annotations

from engine.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig

LOCAL_RECIPES = ("tensorwise", "rowwise")
TE_RECIPES = ("tensorwise", "delayed", "mxfp8")
MIN_CAPABILITY = {"tensorwise": (8, 9), "delayed": (8, 9), "rowwise": (9, 0), "mxfp8": (10, 0)}
ALIGN = 16


def transformer_engine_import_error() -> str | None:
    """None when TE imports; otherwise why not (on a CPU machine even importing it fails)."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # OSError for missing shared objects, not only ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


def device_capability(device) -> tuple[int, int] | None:
    import torch

    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def check_backbone(model: ModelConfig, is_cuda: bool) -> bool:
    """True when the TE layer spec is to be used; a TE request that cannot run stops here."""
    if model.transformer_impl == "local":
        return False
    if model.transformer_impl != "transformer_engine":
        raise ConfigError(f"model.transformer_impl={model.transformer_impl!r}: expected local or transformer_engine")
    if not is_cuda:
        raise ConfigError("model.transformer_impl=transformer_engine needs a CUDA GPU; use "
                          "model.transformer_impl=local on this machine")
    why = transformer_engine_import_error()
    if why:
        raise ConfigError(f"model.transformer_impl=transformer_engine: transformer_engine does not import ({why}); "
                          "install it (pip install transformer_engine[pytorch]) or use model.transformer_impl=local")
    return True


def local_gemm_dims(model: ModelConfig, tp: int) -> dict[str, int]:
    """Per-TP-shard model dimensions that the FP8 products contract over or produce (both must be
    multiples of 16 for torch._scaled_mm on CUDA); token counts are padded inside the layer."""
    head_dim = model.hidden_size // model.num_attention_heads
    qkv = (model.num_attention_heads + 2 * model.num_query_groups) * head_dim
    return {
        "model.hidden_size": model.hidden_size,
        "model.hidden_size / parallel.tp (attention output projection input)": model.hidden_size // tp,
        "(heads + 2 x query groups) x head dim / parallel.tp (QKV projection output)": qkv // tp,
        "model.ffn_hidden_size / parallel.tp": model.ffn_hidden_size // tp,
    }


def check_fp8(model: ModelConfig, par: ParallelConfig, train: TrainConfig, use_te: bool,
              capability: tuple[int, int] | None) -> None:
    """Refuses an FP8 setting this implementation or GPU cannot run. `capability`: the CUDA
    device's (major, minor), None on CPU (local FP8 runs there through torch's CPU _scaled_mm,
    which is how it is tested; it is not faster there)."""
    recipe = train.fp8
    if recipe == "off":
        return
    if use_te:
        if recipe not in TE_RECIPES:
            raise ConfigError(f"train.fp8={recipe} with model.transformer_impl=transformer_engine: Transformer "
                              f"Engine has no per-row recipe; use one of {', '.join(TE_RECIPES)}, or "
                              "model.transformer_impl=local")
    elif recipe not in LOCAL_RECIPES:
        raise ConfigError(f"train.fp8={recipe} is a Transformer Engine recipe: it needs "
                          "model.transformer_impl=transformer_engine (a CUDA GPU with TE installed); "
                          f"model.transformer_impl=local runs {' or '.join(LOCAL_RECIPES)}")
    if capability is not None and tuple(capability) < MIN_CAPABILITY[recipe]:
        need = MIN_CAPABILITY[recipe]
        raise ConfigError(f"train.fp8={recipe} needs a GPU of compute capability {need[0]}.{need[1]} or newer; "
                          f"this one is {capability[0]}.{capability[1]}")
    if not use_te:
        bad = {k: v for k, v in local_gemm_dims(model, par.tp).items() if v % ALIGN}
        if bad:
            raise ConfigError(f"train.fp8={recipe}: FP8 matrix products need these dimensions per tensor-parallel "
                              f"rank to be multiples of {ALIGN}: "
                              + "; ".join(f"{k} = {v}" for k, v in bad.items()))


def check_start_up(model: ModelConfig, par: ParallelConfig, train: TrainConfig) -> bool:
    """The backbone and FP8 checks before any process group exists, on the GPU this process will
    use (torchrun's LOCAL_RANK); build_model repeats them on the runtime's device. Returns use_te."""
    import os

    import torch

    cuda = torch.cuda.is_available()
    use_te = check_backbone(model, cuda)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    check_fp8(model, par, train, use_te, device_capability(device))
    return use_te


def te_fp8_settings(train: TrainConfig, use_te: bool) -> dict:
    """megatron TransformerConfig FP8 fields (TE path only; the local path leaves them unset)."""
    if train.fp8 == "off" or not use_te:
        return {}
    settings = {"fp8": "hybrid", "fp8_recipe": train.fp8}  # hybrid: e4m3 forward, e5m2 gradients
    if train.fp8 == "delayed":
        # scales from the largest amax of the last 1024 steps (megatron's and TE's usual setting)
        settings.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return settings

