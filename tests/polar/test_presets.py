import pytest

from engine.config import ConfigError, EngineConfig, load_config
from polar.presets import PRESETS_DIR, preset_names, resolve_config


def test_the_shipped_presets():
    assert preset_names() == ["polar_1_8b", "polar_7b", "tiny_cpu"]


@pytest.mark.parametrize("name,run_dir", [("tiny_cpu", "runs/default"), ("polar_1_8b", "runs/polar_1_8b"),
                                          ("polar_7b", "runs/polar_7b")])
def test_every_preset_loads_into_the_pretrain_config(name, run_dir):
    from polar.pretrain_recipe import PretrainConfig

    assert load_config(PretrainConfig, resolve_config(name)).run_dir == run_dir


def test_a_name_with_or_without_suffix_is_the_shipped_file():
    assert resolve_config("polar_7b") == resolve_config("polar_7b.yaml") == str(PRESETS_DIR / "polar_7b.yaml")
    assert resolve_config(None) == str(PRESETS_DIR / "tiny_cpu.yaml")


def test_an_existing_file_wins_over_a_preset_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "polar_7b.yaml").write_text("train:\n  lr: 0.25\n")
    assert resolve_config("polar_7b.yaml") == "polar_7b.yaml"
    assert load_config(EngineConfig, resolve_config("polar_7b.yaml")).train.lr == 0.25
    # the bare name has no file behind it here, so it still means the preset
    assert resolve_config("polar_7b") == str(PRESETS_DIR / "polar_7b.yaml")


def test_a_path_with_folders_is_never_a_preset(tmp_path):
    with pytest.raises(ConfigError, match="not a preset"):
        resolve_config(str(tmp_path / "tiny_cpu.yaml"))


def test_an_unknown_name_lists_the_presets():
    with pytest.raises(ConfigError, match=r"--config tiny_gpu: no such file, and not a preset "
                                          r"\(presets: polar_1_8b, polar_7b, tiny_cpu\)"):
        resolve_config("tiny_gpu")


def test_a_user_file_builds_on_a_preset_through_base(tmp_path):
    # `base:` is resolved next to the file that names it; a path to the shipped preset works from anywhere
    (tmp_path / "mine.yaml").write_text(f"base: {PRESETS_DIR / 'polar_7b.yaml'}\nparallel:\n  tp: 8\n")
    cfg = load_config(EngineConfig, resolve_config(str(tmp_path / "mine.yaml")))
    assert cfg.parallel.tp == 8 and cfg.model.hidden_size == 4096
