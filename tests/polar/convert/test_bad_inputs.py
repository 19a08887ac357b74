"""Corrupt or malformed converter inputs stop with one `polar convert ...: FILE: reason` line and exit
status 2, never a traceback; and a tokenizer larger than the model is refused instead of padded."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="pip install transformers safetensors")

from polar.convert import engine_to_hf, hf_to_engine  # noqa: E402
from polar.convert.hf_checkpoint import ConvertError  # noqa: E402
from polar.convert.tokenizer_files import load as load_tokenizer  # noqa: E402
from tests.polar.convert import tiny_models as tm  # noqa: E402

QUIET = {"log": lambda *a: None}


def _config(**changes):
    def edit(src: Path):
        cfg = json.loads((src / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                cfg.pop(key)
            else:
                cfg[key] = value
        (src / "config.json").write_text(json.dumps(cfg))
    return edit


def _write(name: str, text: str):
    def edit(src: Path):
        (src / name).write_text(text)
    return edit


def _truncate(src: Path):
    p = src / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage_header(src: Path):
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}" + b"\0" * 100)


HF_CASES = {
    "truncated_safetensors": (_truncate, r"model.safetensors: not a readable safetensors file"),
    "garbage_safetensors": (_garbage_header, r"model.safetensors: not a readable safetensors file"),
    "bad_tokenizer_json": (_write("tokenizer.json", "{not json"), r"tokenizer.json: not a tokenizer.json"),
    "bad_tokenizer_config": (_write("tokenizer_config.json", "{not json"), r"tokenizer_config.json: not valid JSON"),
    "config_a_list": (_write("config.json", "[1, 2]"), r"config.json: must hold a JSON object, got list"),
    "no_heads": (_config(num_attention_heads=None), r"config.json: no 'num_attention_heads'"),
    "no_hidden_size": (_config(hidden_size=None), r"config.json: no 'hidden_size'"),
    "heads_a_string": (_config(num_attention_heads="6"), r"num_attention_heads must be a positive integer, got '6'"),
    "heads_zero": (_config(num_attention_heads=0), r"num_attention_heads must be a positive integer, got 0"),
    "kv_heads_not_dividing": (_config(num_key_value_heads=4), r"num_key_value_heads=4 does not divide"),
    "rope_scaling_a_string": (_config(rope_scaling="linear"), r"rope_scaling must be an object"),
    "architectures_a_string": (_config(architectures="LlamaForCausalLM"),
                               r"'architectures' must be a list of class names .*got 'LlamaForCausalLM'"),
}


def _refused_in_one_line(capsys, main, src, dst, prefix: str, message: str) -> None:
    """Exit 2 with one stderr line starting with `prefix` and matching `message`; nothing written."""
    capsys.readouterr()  # drop what came before (save_pretrained's progress bars)
    assert main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(prefix), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not dst.exists()


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_to_engine_names_the_bad_file(tmp_path, capsys, case):
    mutate, message = HF_CASES[case]
    src = tm.save(tm.random_seq_cls(tm.llama_config("llama")), tmp_path / "src")
    mutate(src)
    _refused_in_one_line(capsys, hf_to_engine.main, src, tmp_path / "engine", f"polar convert hf-to-engine: {src}",
                         message)


def test_a_corrupt_shard_is_named(tmp_path):
    # shards are opened after config.json and the index were read (their headers say which tensors they hold)
    src = tm.save(tm.random_seq_cls(tm.llama_config("llama")), tmp_path / "src", max_shard_size="40KB")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ConvertError, match=rf"{shard}: not a readable safetensors file"):
        hf_to_engine.convert(src, tmp_path / "engine", **QUIET)


# ---- the tokenizer's size against the model's -------------------------------------------------
def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    # 61 tokens, the reward tokens among them: nothing is appended, so the 11 ids past the model's
    # 50 rows would get made-up embeddings; the tokenizer is not this model's
    src = tm.save(tm.random_seq_cls(tm.llama_config("llama", vocab=50)), tmp_path / "src")
    with pytest.raises(ConvertError, match=r"tokenizer.json: the tokenizer has 61 tokens but .*config.json gives "
                                           r"vocab_size=50; pass the tokenizer the model was trained with"):
        hf_to_engine.convert(src, tmp_path / "engine", **QUIET)
    assert not (tmp_path / "engine").exists()


@pytest.mark.parametrize("model_vocab,new_rows", [(59, 2), (60, 1), (64, 0)])
def test_the_embedding_grows_by_the_appended_reward_tokens_only(tmp_path, model_vocab, new_rows):
    # the source tokenizer (59 tokens) lacks both reward tokens: they get ids 59 and 60
    src = tm.save(tm.random_seq_cls(tm.llama_config("llama", vocab=model_vocab)), tmp_path / "src",
                  with_reward_tokens=False)
    logs = []
    dst = hf_to_engine.convert(src, tmp_path / "engine", log=logs.append)
    tok = load_tokenizer(dst / "tokenizer")
    assert (tok.reward_sep_id, tok.reward_token_id) == (59, 60)
    assert f"vocab_size: {max(model_vocab, 61)}" in (dst / "model.yaml").read_text()
    grew = [m for m in logs if "new embedding row(s)" in m]
    assert grew == ([f"tokenizer grew to 61 tokens (the reward tokens were added): {new_rows} new embedding row(s) "
                     "set to the mean embedding"] if new_rows else [])


# ---- engine-to-hf: the tokenizer beside the engine checkpoint --------------------------------
@pytest.fixture(scope="module")
def engine_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    src = tm.save(tm.random_seq_cls(tm.llama_config("llama")), root / "src")
    return hf_to_engine.convert(src, root / "engine", **QUIET)


SETTINGS_OK = {"bos": "<s>", "pad": "</s>", "reward_sep": "<|reward|>", "reward_token": "[UNUSED_TOKEN_130]"}
ENGINE_CASES = {
    "settings_not_json": ("polar_tokenizer.json", "{oops", r"polar_tokenizer.json: not valid JSON"),
    "settings_missing_key": ("polar_tokenizer.json", json.dumps({"bos": "<s>", "pad": "</s>"}),
                             r"polar_tokenizer.json: 'reward_sep' must name a token string \(missing\)"),
    "settings_a_list": ("polar_tokenizer.json", "[]", r"polar_tokenizer.json: must hold a JSON object"),
    "tokenizer_not_json": ("tokenizer.json", "{oops", r"tokenizer.json: not a tokenizer.json"),
    "bos_not_in_vocab": ("polar_tokenizer.json", json.dumps({**SETTINGS_OK, "bos": "<nope>"}),
                         r"polar_tokenizer.json: bos='<nope>' is not in .*tokenizer.json's vocabulary"),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_engine_to_hf_names_the_bad_tokenizer_file(engine_ckpt, tmp_path, capsys, case):
    name, text, message = ENGINE_CASES[case]
    src = tmp_path / "engine"
    shutil.copytree(engine_ckpt, src)
    (src / "tokenizer" / name).write_text(text)
    _refused_in_one_line(capsys, engine_to_hf.main, src, tmp_path / "hf",
                         f"polar convert engine-to-hf: {src / 'tokenizer'}", message)
