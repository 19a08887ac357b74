"""config.json keys that change what transformers computes: each is read as transformers 5 reads it
(the rewards of the converted checkpoint equal those of transformers loading the same directory) or
refused with a message naming the key, its value and what is supported; none is ignored."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="pip install transformers safetensors")

from polar.convert import hf_to_engine  # noqa: E402
from polar.convert.hf_checkpoint import ConvertError  # noqa: E402
from tests.polar.convert import helpers, tiny_models as tm  # noqa: E402

QUIET = {"log": lambda *a: None}
LINEAR = {"rope_type": "linear", "factor": 4.0}
NULL = object()


def _source(tmp_path: Path, family: str = "llama", shape: dict | None = None, **changes) -> Path:
    """A tiny sequence classifier (`shape`: llama_config's keys) saved by transformers 5 (its
    config.json keeps rope_theta inside rope_parameters), then config.json edited: a value None
    removes the key, NULL writes null."""
    src = tm.save(tm.random_seq_cls(tm.llama_config(family, **(shape or {}))), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = None if value is NULL else value
    (src / "config.json").write_text(json.dumps(cfg))
    return src


# at head dim 8, theta 100 against 10000 and a linear factor of 4 turn the angles of the tests'
# positions (up to 17) far enough apart for every misreading to change the rewards
HONOURED = {
    "theta_inside_rope_parameters_wins_over_the_top_level_one":
        ("llama", {"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}),
    "rope_scaling_replaces_rope_parameters_whole":
        ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
                   "rope_scaling": {"type": "linear", "factor": 4.0}}),
    "theta_inside_rope_scaling_wins_over_the_top_level_one":
        ("llama", {"rope_theta": 1e4, "rope_scaling": {**LINEAR, "rope_theta": 100.0}}),
    "type_instead_of_rope_type_in_rope_parameters":
        ("llama", {"rope_parameters": {"type": "linear", "factor": 4.0, "rope_theta": 100.0}}),
    "transformers_4_keys": ("llama", {"rope_parameters": None, "rope_theta": 100.0,
                                      "rope_scaling": {"type": "linear", "factor": 4.0}}),
    "swish_is_silu": ("llama", {"hidden_act": "swish"}),
    "partial_rotary_factor_one": ("llama", {"partial_rotary_factor": 1.0}),
    # keys Llama's and Qwen2's transformers code does not read (a window of 4 tokens would change
    # every reward here; the multipliers are Granite's)
    "qwen2_window_without_use_sliding_window": ("qwen2", {"sliding_window": 4, "use_sliding_window": False}),
    "llama_has_no_window": ("llama", {"sliding_window": 4}),
    "llama_ignores_pretraining_tp_and_granite_multipliers":
        ("llama", {"pretraining_tp": 2, "embedding_multiplier": 12.0, "logits_scaling": 8.0,
                   "attention_multiplier": 0.1, "residual_multiplier": 0.2}),
}


@pytest.mark.parametrize("case", list(HONOURED))
def test_keys_are_read_as_transformers_reads_them(tmp_path, case):
    import torch
    import transformers

    family, changes = HONOURED[case]
    src = _source(tmp_path, family, **changes)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(str(src), dtype=torch.float32).eval()
    helpers.check_scores(hf_to_engine.convert(src, tmp_path / "engine", **QUIET), ref, seed=7)


def test_an_absent_max_position_embeddings_is_the_architectures_own(tmp_path):
    """transformers' LlamaConfig default (2048), also as yarn's original context: the engine's
    16384 would move yarn's frequency ramp (indices 1-3 at 2048, 1-4 at 16384) and change the rewards."""
    import torch
    import transformers

    from polar.convert.engine_io import read_model_config

    src = _source(tmp_path, max_position_embeddings=None,
                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(str(src), dtype=torch.float32).eval()
    dst = hf_to_engine.convert(src, tmp_path / "engine", **QUIET)
    model = read_model_config(dst / "model.yaml")
    assert (model.max_position_embeddings, model.rope_original_max_position_embeddings) == (2048, 2048)
    helpers.check_scores(dst, ref, seed=8)


@pytest.mark.parametrize("family, shape", [("mistral", {"num_attention_heads": 16, "num_key_value_heads": 8}),
                                           ("qwen2", {"num_attention_heads": 64, "num_key_value_heads": 32})])
def test_an_absent_num_key_value_heads_is_the_architectures_own(tmp_path, family, shape):
    """MistralConfig's 8 and Qwen2Config's 32, whatever the heads: taking num_attention_heads, as
    LlamaConfig does, refused these checkpoints that transformers loads and runs."""
    import torch
    import transformers

    from polar.convert.engine_io import read_model_config

    src = _source(tmp_path, family, {**shape, "hidden_size": 8 * shape["num_attention_heads"]},
                  num_key_value_heads=None)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(str(src), dtype=torch.float32).eval()
    assert ref.config.num_key_value_heads == shape["num_key_value_heads"]
    dst = hf_to_engine.convert(src, tmp_path / "engine", **QUIET)
    assert read_model_config(dst / "model.yaml").num_query_groups == shape["num_key_value_heads"]
    helpers.check_scores(dst, ref, seed=9)


REFUSED = {
    # transformers rotates by inf or NaN angles: rewards that mean nothing
    "rope_theta_zero": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 0}},
                        r"config.json: rope_parameters.rope_theta must be more than 0, got 0$"),
    "rope_theta_negative": ("llama", {"rope_parameters": None, "rope_theta": -5.0},
                            r"config.json: rope_theta must be more than 0, got -5$"),
    "rope_theta_nan": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}},
                       r"config.json: rope_parameters.rope_theta must be a finite number, got nan$"),
    "rope_theta_infinite_in_rope_scaling": ("llama", {"rope_scaling": {**LINEAR, "rope_theta": 1e999}},
                                            r"config.json: rope_scaling.rope_theta must be a finite number, got inf"),
    "rope_theta_past_float": ("llama", {"rope_parameters": None, "rope_theta": 10 ** 400},
                              r"config.json: rope_theta must be a finite number, got 1000"),
    "factor_infinite": ("llama", {"rope_scaling": {**LINEAR, "factor": float("inf")}},
                        r"config.json: rope_scaling.factor must be a finite number, got inf"),
    # each class's default, then the weights: not a bare shape mismatch
    "qwen2_kv_heads_absent": ("qwen2", {"num_key_value_heads": None},
                              r"config.json: num_key_value_heads=32 \(absent: Qwen2's default is 32\) does not "
                              r"divide num_attention_heads=6"),
    "mistral_kv_heads_absent": ("mistral", {"num_key_value_heads": None},
                                r"config.json: num_key_value_heads=8 \(absent: Mistral's default is 8\) does not "
                                r"divide num_attention_heads=6"),
    "mistral_kv_heads_null": ("mistral", {"num_key_value_heads": NULL},
                              r"config.json: num_key_value_heads must be a positive integer, got None"),
    "llama_kv_heads_absent": ("llama", {"num_key_value_heads": None},
                              r"config.json: num_key_value_heads=6 \(absent: num_attention_heads, transformers' "
                              r"default\), but model.layers.0.self_attn.k_proj.weight holds 2 key-value heads of "
                              r"size 8; give num_key_value_heads in config.json"),
    "qwen2_kv_heads_null": ("qwen2", {"num_key_value_heads": NULL},
                            r"config.json: num_key_value_heads=6 \(null: num_attention_heads\), but "
                            r"model.layers.0.self_attn.k_proj.weight holds 2 key-value heads"),
    "partial_rotary_factor": ("llama", {"partial_rotary_factor": 0.5},
                              r"config.json: partial_rotary_factor=0.5 \(RoPE on part of each head\) is not "
                              r"supported; the engine rotates every dimension of a head \(partial_rotary_factor 1 "
                              r"or absent\)"),
    "partial_rotary_factor_in_rope_parameters":
        ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}},
         r"rope_parameters.partial_rotary_factor=0.25 \(RoPE on part of each head\) is not supported"),
    "partial_rotary_factor_in_rope_scaling": ("llama", {"rope_scaling": {**LINEAR, "partial_rotary_factor": 0.5}},
                                              r"rope_scaling.partial_rotary_factor=0.5 \(RoPE on part"),
    "another_model_type": ("llama", {"model_type": "granite"},
                           r"model_type 'granite' does not match architecture 'LlamaForSequenceClassification' "
                           r"\(model_type 'llama'\); transformers would build a granite model"),
    "mistral_window_absent": ("mistral", {"sliding_window": None},
                              r"sliding-window attention \(sliding_window=4096 \(absent: Mistral's default is "
                              r"4096\)\) is not supported; the engine attends over the whole input"),
    "mistral_window": ("mistral", {"sliding_window": 4}, r"sliding-window attention \(sliding_window=4\) is not "
                                                         r"supported"),
    "qwen2_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 4}, r"use_sliding_window=true is not "
                                                                                r"supported"),
    # RoPE settings per layer type (transformers 5's nested form): Qwen2, whose config declares layer_types,
    # fails on them in transformers; Llama's reads past them to plain RoPE; the converter read plain RoPE
    "rope_per_layer_type": ("qwen2", {"rope_parameters": {"full_attention": {**LINEAR, "rope_theta": 100.0}}},
                            r"config.json: rope_parameters.full_attention: RoPE settings per layer type are not "
                            r"supported; give one rope_type, rope_theta, ... for every layer$"),
    "rope_per_layer_type_in_rope_scaling": ("llama", {"rope_scaling": {"full_attention": LINEAR}},
                                            r"config.json: rope_scaling.full_attention: RoPE settings per layer"),
    "gelu": ("llama", {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported \(SwiGLU with silu only\)"),
    "mlp_bias": ("llama", {"mlp_bias": True}, r"mlp_bias=true is not supported"),
    "scaling_without_factor": ("llama", {"rope_scaling": {"rope_type": "linear"}},
                               r"linear RoPE scaling without factor"),
    "rope_type_null": ("llama", {"rope_scaling": {"rope_type": None, "type": "linear", "factor": 2.0}},
                       r"RoPE scaling type None is not supported \(supported: default, linear, dynamic, llama3, "
                       r"yarn\)"),
    "factor_zero": ("llama", {"rope_scaling": {**LINEAR, "factor": 0}}, r"rope_scaling.factor must be more than 0"),
    "top_level_original_not_a_number": ("llama", {"original_max_position_embeddings": "8k", "rope_scaling": {
        **LINEAR, "rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
        r"config.json: original_max_position_embeddings must be a positive integer, got '8k'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_keys_the_engine_cannot_compute_are_refused_naming_them(tmp_path, case):
    family, changes, message = REFUSED[case]
    src = _source(tmp_path, family, **changes)
    with pytest.raises(ConvertError, match=message):
        hf_to_engine.convert(src, tmp_path / "engine", **QUIET)
    assert not (tmp_path / "engine").exists()
