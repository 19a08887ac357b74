"""A conversion writes its output directory whole or not at all: one cut short (a full disk, a kill)
leaves no DST that looks converted but lacks its tokenizer or model.yaml, nor one that blocks the
rerun ("exists and is not empty"); and a DST that cannot be created is one ConvertError naming it."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="pip install transformers safetensors")

from polar.convert import engine_to_hf, hf_to_engine  # noqa: E402
from polar.convert.hf_checkpoint import ConvertError  # noqa: E402
from tests.polar.convert import helpers, tiny_models as tm  # noqa: E402

QUIET = {"log": lambda *a: None}


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.fixture(scope="module")
def engine_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    ref = tm.random_seq_cls(tm.llama_config("llama"))
    return ref, tm.save(ref, root / "src"), hf_to_engine.convert(root / "src", root / "engine", **QUIET)


def _cut_short_then_rerun(module, step: str, src, dst, monkeypatch) -> None:
    """module.convert(src, dst) with `step` failing as a full disk does: one ConvertError naming dst,
    nothing left beside it; then the same command again, which completes."""
    monkeypatch.setattr(module, step, _disk_full)
    with pytest.raises(ConvertError, match=rf"{dst}: .*No space left on device"):
        module.convert(src, dst, **QUIET)
    assert sorted(p.name for p in dst.parent.iterdir()) == []
    monkeypatch.undo()
    module.convert(src, dst, **QUIET)


def test_hf_to_engine_cut_short_leaves_nothing_and_reruns(engine_ckpt, tmp_path, monkeypatch):
    ref, src, _ = engine_ckpt
    dst = tmp_path / "engine"
    # the weights are saved, model.yaml is not: the point where the old code left a loadable-looking DST
    _cut_short_then_rerun(hf_to_engine, "write_model_yaml", src, dst, monkeypatch)
    assert sorted(p.name for p in dst.iterdir()) == ["latest", "model.yaml", "step_00000000", "tokenizer"]
    from polar.convert.tokenizer_files import load as load_tokenizer

    tok = load_tokenizer(dst / "tokenizer")
    groups = helpers.random_groups(0, 3, 5, tm.len_vocab(), tok.reward_token_id)
    want = helpers.hf_scores(ref, helpers.unpacked_inputs(groups))
    got = helpers.engine_scores(dst, groups, [1, 2], tok.pad_id)
    assert want.abs().max() > 1e-3
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_engine_to_hf_cut_short_leaves_nothing_and_reruns(engine_ckpt, tmp_path, monkeypatch):
    _, _, engine = engine_ckpt
    dst = tmp_path / "hf"
    # weights and config.json written, the tokenizer not: transformers would load the model
    _cut_short_then_rerun(engine_to_hf, "copy_tokenizer", engine, dst, monkeypatch)
    assert (dst / "tokenizer.json").is_file() and (dst / "config.json").is_file()


@pytest.mark.parametrize("direction", ["hf-to-engine", "engine-to-hf"])
def test_an_existing_empty_destination_is_filled(engine_ckpt, tmp_path, direction):
    _, src, engine = engine_ckpt
    dst = tmp_path / "out"
    dst.mkdir()
    if direction == "hf-to-engine":
        hf_to_engine.convert(src, dst, **QUIET)
        assert (dst / "model.yaml").is_file()
    else:
        engine_to_hf.convert(engine, dst, **QUIET)
        assert (dst / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("direction", ["hf-to-engine", "engine-to-hf"])
def test_a_destination_under_a_file_is_one_line_naming_it(engine_ckpt, tmp_path, capsys, direction):
    _, src, engine = engine_ckpt
    (tmp_path / "a_file").write_text("x")
    dst = tmp_path / "a_file" / "out"
    main = hf_to_engine.main if direction == "hf-to-engine" else engine_to_hf.main
    capsys.readouterr()
    assert main([str(src if direction == "hf-to-engine" else engine), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"polar convert {direction}: {dst}") and "Traceback" not in err, err


@pytest.mark.parametrize("direction", ["hf-to-engine", "engine-to-hf"])
def test_a_second_conversion_to_a_destination_being_written_is_refused(engine_ckpt, tmp_path, monkeypatch,
                                                                      direction):
    """Two conversions to one DST at once shared its `.DST.partial`: the second cleared the first's
    files and wrote into the same directory, and what was renamed to DST could be a mix of the two
    or half of one. The second, started here while the first writes its last files, is now refused,
    naming DST and the first's process, and touches nothing; the first publishes its whole output."""
    import os

    _, src, engine = engine_ckpt
    module, source, step = ((hf_to_engine, src, "write_model_yaml") if direction == "hf-to-engine" else
                            (engine_to_hf, engine, "_save_safetensors"))
    dst = tmp_path / "out"
    module.convert(source, tmp_path / "ref" / "out", **QUIET)
    real, second = getattr(module, step), []

    def step_and_a_second_run(*args):
        if not second:
            second.append("not refused")
            try:
                module.convert(source, dst, **QUIET)
            except ConvertError as e:
                second[0] = str(e)
        real(*args)

    monkeypatch.setattr(module, step, step_and_a_second_run)
    module.convert(source, dst, **QUIET)
    assert second[0].startswith(f"{dst}: another conversion to it is running (pid {os.getpid()} on "), second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]
    want = {p.relative_to(tmp_path / "ref" / "out") for p in (tmp_path / "ref" / "out").rglob("*")}
    assert {p.relative_to(dst) for p in dst.rglob("*")} == want
    for name in ("config.json", "model.yaml", "tokenizer/tokenizer.json"):
        if (dst / name).exists():
            assert (dst / name).read_bytes() == (tmp_path / "ref" / "out" / name).read_bytes()
