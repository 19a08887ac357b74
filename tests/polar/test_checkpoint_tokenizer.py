"""polar.checkpoint_tokenizer: which tokenizer a checkpoint was trained with, from the files a run,
a conversion or a data build leaves; an error, not bytes, when nothing says."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from polar.checkpoint_tokenizer import TokenizerNotFound, find, save_beside


def _tokenizer(path: Path, marker: str = "a") -> Path:
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_text(json.dumps({"marker": marker}))
    (path / "polar_tokenizer.json").write_text(json.dumps({"reward_token": "<r>"}))
    return path


def _run(root: Path, config: dict | None) -> Path:
    """A run directory with one complete step (find reads no weights, only the files around them)."""
    step = root / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")  # with megatron's metadata.json: what makes it a complete step
    (step / "metadata.json").write_text("{}")
    if config is not None:
        (root / "config.yaml").write_text(yaml.safe_dump(config))
    return step


def test_a_tokenizer_beside_the_checkpoints_wins(tmp_path):
    step = _run(tmp_path / "run", {"data": {"path": ""}})
    _tokenizer(tmp_path / "run" / "checkpoints" / "tokenizer")
    assert find(str(step)) == str(tmp_path / "run" / "checkpoints" / "tokenizer")


def test_a_run_on_the_synthetic_data_is_byte_tokenized(tmp_path):
    assert find(str(_run(tmp_path / "run", {"data": {"path": ""}, "synthetic": {}}))) == "byte"


def test_a_run_on_built_data_takes_the_tokenizer_its_metadata_names(tmp_path):
    tok = _tokenizer(tmp_path / "bpe")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "part-00000-of-00001.json").write_text(json.dumps({"tokenizer": str(tok)}))
    assert find(str(_run(tmp_path / "run", {"data": {"path": str(tmp_path / "ds")}}))) == str(tok)

    (tmp_path / "ds" / "part-00000-of-00001.json").write_text(json.dumps({"tokenizer": "gone/bpe"}))
    with pytest.raises(TokenizerNotFound, match="whose tokenizer 'gone/bpe'.* is not found here"):
        find(str(_run(tmp_path / "run2", {"data": {"path": str(tmp_path / "ds")}})))


def test_a_finetuning_run_takes_its_setting_or_its_init_checkpoints_tokenizer(tmp_path):
    tok = _tokenizer(tmp_path / "base" / "tokenizer")
    base_step = tmp_path / "base" / "step_00000000"
    base_step.mkdir()
    (base_step / "trainer_state.json").write_text("{}")
    (base_step / "metadata.json").write_text("{}")
    (tmp_path / "base" / "latest").write_text(base_step.name)
    ft = {"finetune": {"tokenizer": ""}, "checkpoint": {"init_from": str(tmp_path / "base")}, "data": {"path": ""}}
    assert find(str(_run(tmp_path / "ft", ft))) == str(tok)  # not "byte", although data.path is empty

    other = _tokenizer(tmp_path / "other", "b")
    ft["finetune"]["tokenizer"] = str(other)
    assert find(str(_run(tmp_path / "ft2", ft))) == str(other)

    ft["finetune"]["tokenizer"] = ""
    ft["checkpoint"]["init_from"] = str(tmp_path / "removed")
    with pytest.raises(TokenizerNotFound, match="checkpoint.init_from=.*removed"):
        find(str(_run(tmp_path / "ft3", ft)))


def test_nothing_to_go_by_is_an_error_not_bytes(tmp_path):
    with pytest.raises(TokenizerNotFound, match="no tokenizer/ beside the checkpoint and no run config.yaml"):
        find(str(_run(tmp_path / "bare", None)))


def test_save_beside_copies_the_tokenizer_files_and_skips_bytes(tmp_path):
    src = _tokenizer(tmp_path / "bpe")
    save_beside(str(tmp_path / "ckpt"), "byte")
    assert not (tmp_path / "ckpt").exists()
    save_beside(str(tmp_path / "ckpt"), str(src / "tokenizer.json"))  # the file names its directory
    save_beside(str(tmp_path / "ckpt"), str(src))  # again (every rank calls it): same result
    got = tmp_path / "ckpt" / "tokenizer"
    assert sorted(p.name for p in got.iterdir()) == ["polar_tokenizer.json", "tokenizer.json"]
    for name in ("tokenizer.json", "polar_tokenizer.json"):
        assert (got / name).read_bytes() == (src / name).read_bytes()


def test_same_tells_tokenizers_apart_by_their_ids_not_their_paths(tmp_path):
    import shutil

    from polar.checkpoint_tokenizer import same
    from tests.polar.test_tokenizer import train_bpe

    bpe = train_bpe(tmp_path / "bpe")
    copy = shutil.copytree(bpe, tmp_path / "elsewhere")
    other = train_bpe(tmp_path / "bpe_small", vocab_size=500)
    assert same("byte", "byte") and same(bpe, str(copy)) and same(bpe, bpe + "/")
    assert not same("byte", bpe) and not same(bpe, other)


def test_a_tokenizer_given_against_the_checkpoints_own_is_refused(tmp_path):
    """`polar score/serve/convert --tokenizer byte` on a model trained with a 602-id BPE ran: the
    byte tokenizer's 260 ids fit the model's vocabulary, so no size check caught it."""
    import shutil

    from polar.checkpoint_tokenizer import TokenizerMismatch, choose
    from tests.polar.test_tokenizer import train_bpe

    bpe = train_bpe(tmp_path / "run" / "checkpoints" / "tokenizer")
    step = _run(tmp_path / "run", {"data": {"path": ""}})
    with pytest.raises(TokenizerMismatch, match=r"--tokenizer byte: .*step_00000004 was trained with .*tokenizer, "
                                                r"which gives other ids; leave --tokenizer out"):
        choose("byte", str(step), "--tokenizer")
    with pytest.raises(TokenizerMismatch, match=r"^finetune.tokenizer=byte: "):
        choose("byte", str(step), "finetune.tokenizer")
    copy = str(shutil.copytree(bpe, tmp_path / "copy"))
    assert choose(copy, str(step), "--tokenizer") == copy  # the same tokenizer, elsewhere
    assert choose(None, str(step), "--tokenizer") == bpe
    # a checkpoint that does not say: the user's word is taken
    bare = tmp_path / "bare" / "step_00000001"
    bare.mkdir(parents=True)
    assert choose("byte", str(bare), "--tokenizer") == "byte"
    with pytest.raises(TokenizerNotFound):
        choose(None, str(bare), "--tokenizer")
    # one that cannot be loaded is left to the caller's load, which names it
    assert choose(str(tmp_path / "nothing"), str(step), "--tokenizer") == str(tmp_path / "nothing")
