"""Which tensors a transformers checkpoint directory holds, read as transformers reads them: every
tensor of every shard the index names (the index's weight_map only picks the files), and
model.safetensors over an index. Where the files disagree with each other, the conversion stops
naming the tensor or file instead of dropping a tensor or reading another file than transformers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="pip install transformers safetensors")

from polar.convert import hf_to_engine  # noqa: E402
from polar.convert.hf_checkpoint import ConvertError, HFCheckpoint  # noqa: E402
from tests.polar.convert import helpers, tiny_models as tm  # noqa: E402

QUIET = {"log": lambda *a: None}
INDEX = "model.safetensors.index.json"


def _sharded(tmp_path: Path):
    ref = tm.random_seq_cls(tm.llama_config("llama"))
    src = tm.save(ref, tmp_path / "src", max_shard_size="40KB")
    assert len(set(_index(src)["weight_map"].values())) > 1
    return ref, src


def _index(src: Path) -> dict:
    return json.loads((src / INDEX).read_text())


def _edit_index(src: Path, edit) -> None:
    index = _index(src)
    edit(index["weight_map"])
    (src / INDEX).write_text(json.dumps(index))


def _add_to_shard(path: Path, name: str, tensor: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors[name] = tensor
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_tensor_the_index_leaves_out_is_read_from_its_shard(tmp_path):
    """transformers loads model.norm.weight from its shard all the same; the converter said the
    checkpoint had no such tensor (and left out an unlisted lm_head.weight without a word)."""
    import transformers

    ref, src = _sharded(tmp_path)
    shard = src / _index(src)["weight_map"]["model.norm.weight"]
    _edit_index(src, lambda weight_map: weight_map.pop("model.norm.weight"))
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(src), dtype=torch.float32)
    assert torch.equal(loaded.model.norm.weight, ref.model.norm.weight)
    ckpt = HFCheckpoint(src)
    assert "model.norm.weight" in ckpt.names() and ckpt.where("model.norm.weight") == str(shard)
    helpers.check_scores(hf_to_engine.convert(src, tmp_path / "engine", **QUIET), ref)


def test_an_unsupported_tensor_the_index_leaves_out_is_named(tmp_path):
    _, src = _sharded(tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    _add_to_shard(shard, "model.layers.0.self_attn.o_proj.bias", torch.zeros(48))
    with pytest.raises(ConvertError, match=rf"{shard}: tensor 'model.layers.0.self_attn.o_proj.bias' has no place"):
        hf_to_engine.convert(src, tmp_path / "engine", **QUIET)


def test_a_listed_tensor_its_shard_lacks_is_named(tmp_path):
    # transformers would start it at random, with a warning in its load report
    _, src = _sharded(tmp_path)
    shard = _index(src)["weight_map"]["model.norm.weight"]
    _edit_index(src, lambda weight_map: weight_map.update({"model.layers.9.mlp.up_proj.weight": shard}))
    with pytest.raises(ConvertError, match=rf"{INDEX}: lists tensor 'model.layers.9.mlp.up_proj.weight' in {shard}, "
                                           r"which does not hold it \(1 such tensor\); download the checkpoint again"):
        HFCheckpoint(src)


def test_a_tensor_moved_to_another_listed_shard_is_read_there(tmp_path):
    _, src = _sharded(tmp_path)
    listed = _index(src)["weight_map"]["model.norm.weight"]
    other = next(f for f in sorted(set(_index(src)["weight_map"].values())) if f != listed)
    _edit_index(src, lambda weight_map: weight_map.update({"model.norm.weight": other}))
    ckpt = HFCheckpoint(src)
    assert ckpt.where("model.norm.weight") == str(src / listed)


def test_a_tensor_in_two_shards_is_named(tmp_path):
    _, src = _sharded(tmp_path)
    weight_map = _index(src)["weight_map"]
    listed = src / weight_map["model.norm.weight"]
    other = next(src / f for f in sorted(set(weight_map.values())) if src / f != listed)
    _add_to_shard(other, "model.norm.weight", torch.ones(48))
    first, second = sorted([listed, other])
    with pytest.raises(ConvertError, match=rf"{second}: tensor 'model.norm.weight' is also in {first}; "):
        HFCheckpoint(src)


def test_a_single_file_beside_an_index_is_refused(tmp_path):
    """transformers loads model.safetensors and ignores the index; the converter read the shards.
    save_pretrained leaves the other kind behind when a directory is saved again, so either may
    be the stale one."""
    _, src = _sharded(tmp_path)
    tm.random_seq_cls(tm.llama_config("llama"), seed=1).save_pretrained(str(tmp_path / "single"))
    (tmp_path / "single" / "model.safetensors").rename(src / "model.safetensors")
    with pytest.raises(ConvertError, match=rf"{src}: holds both model.safetensors and {INDEX} \(with its shards\); "
                                           r"transformers loads model.safetensors"):
        HFCheckpoint(src)


def test_an_index_naming_no_file_is_named(tmp_path):
    _, src = _sharded(tmp_path)
    _edit_index(src, lambda weight_map: weight_map.update({"model.norm.weight": None}))
    with pytest.raises(ConvertError, match=rf"{INDEX}: no 'weight_map' of tensor names to shard files"):
        HFCheckpoint(src)
