"""Tiny random checkpoints of every supported architecture import to the rewards of their
transformers (or, for InternLM2's remote code, an equivalent reference) implementation, export back
to the same tensors, and bad checkpoints stop with a message naming the problem."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="pip install transformers safetensors")

from polar import cli  # noqa: E402
from polar.convert import engine_to_hf, hf_to_engine  # noqa: E402
from polar.convert.hf_checkpoint import ConvertError  # noqa: E402
from polar.convert.tokenizer_files import load as load_tokenizer  # noqa: E402
from tests.polar.convert import helpers, tiny_models as tm  # noqa: E402

RTOL = 1e-5
QUIET = {"log": lambda *a: None}


_check_scores = helpers.check_scores


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# Llama 3.1's scaling with a small original context: at head dim 8 the four frequencies' wavelengths
# (6.3, 63, 628, 6283 positions) fall in every branch (kept, blended, divided by the factor)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
# YaRN at head dim 8 and rope_theta 100 (wavelengths 6.3, 20, 63, 199 positions): beta_fast 4 and
# beta_slow 1 put the ramp's ends at indices 0.81 and 2.02 (0 and 3 truncated), so frequency 0 is
# kept, 1 and 2 blended and 3 divided by the factor; all of them turn far enough within the tests'
# positions (up to 17) for each to change the rewards
YARN = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 4.0, "beta_slow": 1.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("family,extra", [
    ("llama", {}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 5e4}),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    ("llama", {"rope_scaling": dict(LLAMA3)}),  # a copy: transformers adds to the dict it is given
    ("llama", {"rope_scaling": dict(YARN), "rope_theta": 100.0}),
    # untruncated ends (0.81 and 2.02: blends of 16% and 98%), DeepSeek's mscale pair
    ("qwen2", {"rope_scaling": {**YARN, "truncate": False, "mscale": 0.707, "mscale_all_dim": 1.0},
               "rope_theta": 100.0}),
    ("qwen2", {}),  # q/k/v biases
    ("mistral", {}),
], ids=["llama", "llama_rope_linear", "llama_rope_dynamic", "llama_rope_llama3", "llama_rope_yarn",
        "qwen2_rope_yarn_untruncated_mscale", "qwen2_biases", "mistral"])
def test_llama_family_imports_to_the_transformers_rewards(tmp_path, family, extra):
    ref = tm.random_seq_cls(tm.llama_config(family, **extra))
    src = tm.save(ref, tmp_path / "src")
    dst = hf_to_engine.convert(src, tmp_path / "engine", **QUIET)
    _check_scores(dst, ref)


def test_round_trip_reproduces_every_tensor_and_the_rewards(tmp_path, capsys):
    """Qwen2's q/k/v biases go out as a Llama with attention_bias and zero o_proj biases (a model_type
    qwen2 directory gets transformers' own Qwen2Tokenizer: test_served_bos), which imports back."""
    ref = tm.random_seq_cls(tm.llama_config("qwen2"))
    src = tm.save(ref, tmp_path / "src", max_shard_size="40KB")  # sharded source
    dst = hf_to_engine.convert(src, tmp_path / "engine", **QUIET)
    out = engine_to_hf.convert(dst, tmp_path / "hf", **QUIET)
    before, after = _tensors(src), _tensors(out)
    o_biases = {f"model.layers.{i}.self_attn.o_proj.bias" for i in range(2)}
    assert set(after) == set(before) | o_biases
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert all(torch.count_nonzero(after[name]) == 0 for name in o_biases)
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.attention_bias
    capsys.readouterr()
    assert cli.main(["convert", "--help"]) == 0
    # the listing names the class the export writes (it said Llama/Qwen2ForSequenceClassification: none is Qwen2's)
    assert f"an engine checkpoint -> {type(model).__name__} (" in capsys.readouterr().out
    assert "no remote code" in (out / "README.md").read_text()
    _check_scores(dst, model, seed=3)
    again = hf_to_engine.convert(out, tmp_path / "engine_again", **QUIET)
    assert _tensors(engine_to_hf.convert(again, tmp_path / "hf_again", **QUIET)).keys() == after.keys()
    _check_scores(again, model, seed=3)


def test_o_proj_biases_that_are_not_zero_are_refused_naming_one(tmp_path):
    ref = tm.random_seq_cls(tm.llama_config("llama", attention_bias=True))
    src = tm.save(ref, tmp_path / "src")
    with pytest.raises(ConvertError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.o_proj.bias' is not "
                                           r"zero: biases on o_proj \(attention_bias=true\) are not supported"):
        hf_to_engine.convert(src, tmp_path / "engine", **QUIET)
    # Mistral's code builds no biases whatever the key says: refused as before, not read as q/k/v biases
    mistral = tm.save(tm.random_seq_cls(tm.llama_config("mistral")), tmp_path / "mistral")
    _edit_config(mistral, attention_bias=True)
    with pytest.raises(ConvertError, match=r"attention_bias=true \(biases on q/k/v AND o_proj\) is not supported"):
        hf_to_engine.convert(mistral, tmp_path / "engine", **QUIET)


@pytest.mark.parametrize("scaling,theta", [
    (LLAMA3, 5e5),
    ({**YARN, "beta_fast": 6.0, "attention_factor": 1.2, "truncate": False}, 100.0),
], ids=["llama3", "yarn"])
def test_scaled_rope_round_trips_to_the_same_config_and_rewards(tmp_path, scaling, theta):
    import transformers

    ref = tm.random_seq_cls(tm.llama_config("llama", rope_scaling=dict(scaling), rope_theta=theta))
    dst = hf_to_engine.convert(tm.save(ref, tmp_path / "src"), tmp_path / "engine", **QUIET)
    _check_scores(dst, ref, seed=4)
    out = engine_to_hf.convert(dst, tmp_path / "hf", **QUIET)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    saved = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert {k: saved[k] for k in scaling} == scaling
    _check_scores(dst, model, seed=4)
    # InternLM2's own modeling code has neither scaling: that layout is refused, not written wrong
    with pytest.raises(ConvertError, match=f"{scaling['rope_type']} RoPE scaling, which InternLM2's code does not "
                                           "implement"):
        engine_to_hf.convert(dst, tmp_path / "internlm2", fmt="internlm2-reward", **QUIET)


@pytest.mark.parametrize("where", ["top_level", "missing"])
@pytest.mark.parametrize("scaling,theta", [(LLAMA3, 1e4), (YARN, 100.0)], ids=["llama3", "yarn"])
def test_scaled_rope_takes_its_original_context_where_transformers_does(tmp_path, scaling, theta, where):
    """A top-level original_max_position_embeddings (Phi-3 keeps it there) wins over rope_scaling's,
    and without either the model's max_position_embeddings is the original context (here 16 and 256
    against the 64 of LLAMA3 and YARN: other frequency bands, other rewards)."""
    import transformers

    from polar.convert.engine_io import read_model_config

    src = tm.save(tm.random_seq_cls(tm.llama_config("llama", rope_scaling=dict(scaling), rope_theta=theta)),
                  tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    if where == "top_level":
        cfg["original_max_position_embeddings"] = 16
    else:
        del cfg["rope_parameters"]["original_max_position_embeddings"]
    (src / "config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(str(src), dtype=torch.float32).eval()
    dst = hf_to_engine.convert(src, tmp_path / "engine", **QUIET)
    assert read_model_config(dst / "model.yaml").rope_original_max_position_embeddings == {"top_level": 16,
                                                                                           "missing": 256}[where]
    _check_scores(dst, ref, seed=6)


def test_conversion_at_tp2_under_torchrun_gives_the_same_rewards(tmp_path):
    """--tp splits each tensor in the converter itself (q/k/v by whole key-value groups, the SwiGLU
    gate and up halves per rank, o_proj and down_proj by columns, the padded vocabulary by rows)."""
    import os
    import subprocess
    import sys

    ref = tm.random_seq_cls(tm.llama_config("qwen2"))
    src = tm.save(ref, tmp_path / "src")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "polar.convert.hf_to_engine", str(src), str(tmp_path / "engine"), "--tp", "2"]
    env = dict(os.environ, PYTHONPATH=str(helpers.ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=helpers.ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert proc.stdout.count("wrote ") == 1, proc.stdout  # said once, not by every rank
    _check_scores(tmp_path / "engine", ref, seed=4)


# ---- InternLM2 (remote code on the hub: the reference is the equivalent Llama) ------------------
def _internlm2_from_llama(ref, path: Path, reward_model: bool, rope_scaling=None) -> Path:
    """Writes `ref`'s weights in InternLM2's layout: wqkv rows per KV group [q_0..q_{r-1}, k, v]."""
    from safetensors.torch import save_file

    c = ref.config
    d = c.hidden_size // c.num_attention_heads
    g, r = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
    sd = ref.state_dict()
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].reshape(g, r, d, -1)
        k = sd[p + "self_attn.k_proj.weight"].reshape(g, 1, d, -1)
        v = sd[p + "self_attn.v_proj.weight"].reshape(g, 1, d, -1)
        out[p + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, c.hidden_size)
        out[p + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
    if reward_model:
        out["v_head.weight"] = sd["score.weight"]
    else:
        out["output.weight"] = torch.randn(c.vocab_size, c.hidden_size)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path / "model.safetensors"))
    cfg = {"architectures": ["InternLM2ForRewardModel" if reward_model else "InternLM2ForCausalLM"],
           "model_type": "internlm2", "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
           "num_key_value_heads": g, "rms_norm_eps": c.rms_norm_eps, "rope_theta": 1e6,
           "rope_scaling": rope_scaling, "max_position_embeddings": c.max_position_embeddings,
           "vocab_size": c.vocab_size, "bias": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 2}
    if reward_model:
        cfg["reward_token_id"] = 4  # "[UNUSED_TOKEN_130]" of the test tokenizer
    (path / "config.json").write_text(json.dumps(cfg))
    tm.write_tokenizer(path)
    return path


def test_internlm2_reward_model_imports_to_the_reference_rewards_and_exports_its_layout(tmp_path):
    """InternLM2.5's dynamic x2 RoPE is the identity inside max_position_embeddings (HF Llama's dynamic
    type, the reference here, is too); a longer packed sequence is refused, naming the setting."""
    rope = {"type": "dynamic", "factor": 2.0}
    ref = tm.random_seq_cls(tm.llama_config("llama", max_position_embeddings=64, rope_theta=1e6,
                                            rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    src = _internlm2_from_llama(ref, tmp_path / "src", reward_model=True, rope_scaling=rope)
    dst = hf_to_engine.convert(src, tmp_path / "engine", **QUIET)
    tok = load_tokenizer(dst / "tokenizer")
    assert tok.reward_token_id == 4
    groups, _ = _check_scores(dst, ref)

    out = engine_to_hf.convert(dst, tmp_path / "hf", fmt="internlm2-reward", **QUIET)
    before, after = _tensors(src), _tensors(out)
    assert set(before) == set(after) and all(torch.equal(before[n], after[n]) for n in before)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["InternLM2ForRewardModel"] and cfg["reward_token_id"] == 4
    assert cfg["rope_scaling"]["type"] == "dynamic" and cfg["rope_scaling"]["factor"] == 2.0
    assert "not shipped here" in (out / "README.md").read_text()

    from engine.packing import collate
    from engine.scoring import score
    from polar.convert.engine_io import build, read_model_config

    chunks, rt = build(read_model_config(dst / "model.yaml"))
    with pytest.raises(ValueError, match="model.rope_scaling=dynamic.*80 tokens.*max_position_embeddings=64"):
        score(chunks, [collate([groups[:1]], 80, tok.pad_id)], rt)


def test_internlm2_causal_lm_gets_a_zero_value_head(tmp_path):
    ref = tm.random_seq_cls(tm.llama_config("llama"))
    src = _internlm2_from_llama(ref, tmp_path / "src", reward_model=False)
    dst = hf_to_engine.convert(src, tmp_path / "engine", **QUIET)
    out = _tensors(engine_to_hf.convert(dst, tmp_path / "hf", **QUIET))
    assert torch.count_nonzero(out["score.weight"]) == 0
    for name, t in ref.state_dict().items():
        if name != "score.weight":
            assert torch.equal(out[name], t), name


@pytest.mark.parametrize("key,value,message", [
    # InternLM2Config's default: the remote code would build biased layers the checkpoint has no weights for
    ("bias", None, r"bias=True \(absent: InternLM2's default is true\): biases on every InternLM2 linear layer"),
    ("rope_scaling", dict(LLAMA3), r"llama3 RoPE scaling is not part of InternLM2"),
    ("rope_scaling", dict(YARN), r"yarn RoPE scaling is not part of InternLM2"),
])
def test_internlm2_keys_its_code_reads_otherwise_are_refused(tmp_path, key, value, message):
    src = _internlm2_from_llama(tm.random_seq_cls(tm.llama_config("llama")), tmp_path / "src", reward_model=True)
    cfg = json.loads((src / "config.json").read_text())
    if value is None:
        del cfg[key]
    else:
        cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=message):
        hf_to_engine.convert(src, tmp_path / "engine", **QUIET)


def test_data_parallel_scoring_gathers_rewards_in_input_order(tmp_path):
    ref = tm.random_seq_cls(tm.llama_config("llama"))
    dst = hf_to_engine.convert(tm.save(ref, tmp_path / "src"), tmp_path / "engine", **QUIET)
    tok = load_tokenizer(dst / "tokenizer")
    groups = helpers.random_groups(5, 6, 5, tm.len_vocab(), tok.reward_token_id)
    per_sequence = [2, 1, 2, 1]  # an odd split over 2 ranks: 2 batches each, of different sizes
    want = helpers.hf_scores(ref, helpers.unpacked_inputs(groups))
    per_rank = helpers.engine_scores_torchrun(tmp_path, dst, groups, per_sequence, tok.pad_id, 2)
    for rewards in per_rank:
        torch.testing.assert_close(torch.tensor(rewards), want, rtol=RTOL, atol=RTOL * want.abs().max())


# ---- bad input --------------------------------------------------------------------------------
@pytest.fixture
def tiny_src(tmp_path):
    return tm.save(tm.random_seq_cls(tm.llama_config("llama")), tmp_path / "src")


def _edit_config(src: Path, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,message", [
    ({"architectures": ["GPT2LMHeadModel"]}, r"architecture 'GPT2LMHeadModel' is not supported; supported: .*Llama"),
    ({"intermediate_size": 96}, r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(80, 48\), config.json "
                                r"implies \(96, 48\)"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, r"RoPE scaling type 'longrope' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn"}}, r"yarn RoPE scaling without factor"),
    ({"rope_scaling": {**YARN, "beta_fast": 1.0, "beta_slow": 2.0}}, r"rope_scaling.beta_fast must be at least "
                                                                      r"beta_slow"),
    ({"rope_scaling": {**YARN, "beta_slow": -1}}, r"rope_scaling.beta_slow must be a non-negative number, got -1"),
    ({"rope_scaling": {**YARN, "attention_factor": 0}}, r"rope_scaling.attention_factor must be more than 0"),
    ({"rope_scaling": {**YARN, "truncate": "no"}}, r"rope_scaling.truncate must be true or false, got 'no'"),
    ({"rope_scaling": {**YARN, "original_max_position_embeddings": 64.5}},
     r"original_max_position_embeddings must be a positive integer, got 64.5"),
    ({"head_dim": 16}, r"head_dim=16 differs"),
])
def test_bad_checkpoints_are_refused_naming_the_problem(tiny_src, tmp_path, changes, message):
    _edit_config(tiny_src, **changes)
    with pytest.raises(ConvertError, match=message):
        hf_to_engine.convert(tiny_src, tmp_path / "engine", **QUIET)
    assert not (tmp_path / "engine").exists()


def test_an_unsupported_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tm.save(tm.random_seq_cls(tm.llama_config("llama")), tmp_path / "src")
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(48)
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(ConvertError, match=r"'model.layers.0.self_attn.o_proj.bias' has no place .* not supported"):
        hf_to_engine.convert(src, tmp_path / "engine", **QUIET)


def test_a_missing_shard_is_named(tmp_path):
    src = tm.save(tm.random_seq_cls(tm.llama_config("llama")), tmp_path / "src", max_shard_size="40KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(ConvertError, match=rf"{shards[1].name}: listed in model.safetensors.index.json but missing"):
        hf_to_engine.convert(src, tmp_path / "engine", **QUIET)


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tiny_src, tmp_path):
    dst = hf_to_engine.convert(tiny_src, tmp_path / "engine", **QUIET)
    text = (dst / "model.yaml").read_text().replace("ffn_hidden_size: 80", "ffn_hidden_size: 64")
    (tmp_path / "wrong.yaml").write_text(text)
    with pytest.raises(ConvertError, match=r"does not match the model configuration in .*wrong.yaml.*--config"):
        engine_to_hf.convert(dst, tmp_path / "hf", config=str(tmp_path / "wrong.yaml"), **QUIET)


def test_cli_prints_one_message_and_exits_2(tiny_src, tmp_path, capsys):
    (tiny_src / "tokenizer.json").unlink()
    assert hf_to_engine.main([str(tiny_src), str(tmp_path / "engine")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polar convert hf-to-engine: ") and "no tokenizer.json; pass --tokenizer DIR" in err
    assert engine_to_hf.main([str(tmp_path / "nowhere"), str(tmp_path / "hf")]) == 2
    assert "no such engine checkpoint directory" in capsys.readouterr().err
