"""Bad command-line arguments to `polar convert ...` end in one line naming the argument, exit 2."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="pip install transformers safetensors")

from polar.convert import engine_to_hf, hf_to_engine  # noqa: E402
from tests.polar.convert import tiny_models as tm  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    src = tm.save(tm.random_seq_cls(tm.llama_config("llama")), root / "src")
    return src, hf_to_engine.convert(src, root / "engine", log=lambda *a: None)


def _one_line(capsys, main, args, prefix: str, message: str):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


@pytest.mark.parametrize("name", ["missing.yaml", "."], ids=["missing", "a_directory"])
def test_engine_to_hf_config_that_cannot_be_read(converted, tmp_path, capsys, name):
    config = tmp_path / name
    _one_line(capsys, engine_to_hf.main, [str(converted[1]), str(tmp_path / "hf"), "--config", str(config)],
              f"polar convert engine-to-hf: {config}", "cannot be read")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("flag", ["--tp", "--pp"])
def test_hf_to_engine_layout_below_one(converted, tmp_path, capsys, flag):
    _one_line(capsys, hf_to_engine.main, [str(converted[0]), str(tmp_path / "engine"), flag, "0"],
              "polar convert hf-to-engine: ", f"{flag} 0: must be at least 1")
    assert not (tmp_path / "engine").exists()


def test_a_quantized_checkpoint_is_named_as_such(converted, tmp_path, capsys):
    """A GPTQ checkpoint stores q_proj.qweight, not q_proj.weight: without this check the message said
    the checkpoint looked incomplete ("is the checkpoint complete?"), sending users to download it again."""
    import json
    import shutil

    src = tmp_path / "src"
    shutil.copytree(converted[0], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    _one_line(capsys, hf_to_engine.main, [str(src), str(tmp_path / "engine")],
              f"polar convert hf-to-engine: {src}/config.json", "quantization_config (quant_method 'gptq')")


def test_a_checkpoint_saved_from_a_gguf_still_converts(converted, tmp_path):
    """transformers keeps quantization_config {quant_method: gguf} on a model it dequantized from a
    GGUF file; the weights saved from it are float."""
    import json
    import shutil

    src = tmp_path / "src"
    shutil.copytree(converted[0], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf", "gguf_file": "m.gguf", "dequantize": False}
    (src / "config.json").write_text(json.dumps(cfg))
    hf_to_engine.convert(src, tmp_path / "engine", log=lambda *a: None)
