import re

import pytest

from engine.config import ConfigError, EngineConfig
from engine.config_load import load_config
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
    with pytest.raises(ConfigError, match=r"^--config nope: no such file, and not a preset "
                                          r"\(presets: polar_1_8b, polar_7b, tiny_cpu\)$"):
        resolve_config("nope")


@pytest.mark.parametrize("name, near", [("polar_7", "polar_7b"), ("polar_7.yaml", "polar_7b"),
                                        ("tiny_gpu", "tiny_cpu"), ("Polar_1_8B", "polar_1_8b")])
def test_a_near_miss_of_a_preset_name_is_named(name, near):
    with pytest.raises(ConfigError, match="^" + re.escape(f"--config {name}: no such file, and not a preset: did you "
                                                          f"mean {near!r}? (presets: polar_1_8b, polar_7b, tiny_cpu)")):
        resolve_config(name)


def test_a_directory_is_said_to_be_one(tmp_path):
    # it was "--config DIR: no such file, and not a preset", of a directory that is there
    with pytest.raises(ConfigError, match="^" + re.escape(f"--config {tmp_path}: a directory, not a config file; "
                                                          "name a YAML file or a preset (presets: polar_1_8b, ")):
        resolve_config(str(tmp_path))


def test_a_user_file_builds_on_a_preset_through_base(tmp_path):
    # `base:` is resolved next to the file that names it; a path to the shipped preset works from anywhere
    (tmp_path / "mine.yaml").write_text(f"base: {PRESETS_DIR / 'polar_7b.yaml'}\nparallel:\n  tp: 8\n")
    cfg = load_config(EngineConfig, resolve_config(str(tmp_path / "mine.yaml")))
    assert cfg.parallel.tp == 8 and cfg.model.hidden_size == 4096


@pytest.mark.parametrize("name", ["tiny_cpu", "tiny_cpu.yaml"])
def test_a_preset_name_is_a_base(tmp_path, name):
    (tmp_path / "mine.yaml").write_text(f"base: {name}\ntrain:\n  lr: 0.25\n")
    cfg = load_config(EngineConfig, str(tmp_path / "mine.yaml"))
    assert cfg.train.lr == 0.25 and cfg.model.hidden_size == 64 and cfg.run_dir == "runs/default"


def test_a_file_beside_the_config_wins_over_a_preset_of_the_same_name(tmp_path):
    (tmp_path / "tiny_cpu.yaml").write_text("model:\n  hidden_size: 32\n")
    (tmp_path / "mine.yaml").write_text("base: tiny_cpu.yaml\n")
    assert load_config(EngineConfig, str(tmp_path / "mine.yaml")).model.hidden_size == 32


def test_a_base_that_is_neither_a_file_nor_a_preset_lists_the_presets(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: tiny_gpu\n")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'mine.yaml'}: base: tiny_gpu: no such file "
                                                    f"({tmp_path / 'tiny_gpu'}), and not a preset: did you mean "
                                                    "'tiny_cpu'? (presets: polar_1_8b, polar_7b, tiny_cpu)")):
        load_config(EngineConfig, str(tmp_path / "mine.yaml"))
    (tmp_path / "mine.yaml").write_text("base: nope\n")
    with pytest.raises(ConfigError, match=re.escape(f"base: nope: no such file ({tmp_path / 'nope'}), and not a "
                                                    "preset (presets: polar_1_8b, polar_7b, tiny_cpu)")):
        load_config(EngineConfig, str(tmp_path / "mine.yaml"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "mine.yaml").write_text("base: sub\n")
    with pytest.raises(ConfigError, match=re.escape(f"base: sub: a directory ({tmp_path / 'sub'}), not a config "
                                                    "file; name a YAML file or a preset (presets: ")):
        load_config(EngineConfig, str(tmp_path / "mine.yaml"))
    # a path with folders is never a preset name
    (tmp_path / "mine.yaml").write_text("base: sub/tiny_cpu\n")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(EngineConfig, str(tmp_path / "mine.yaml"))


def test_the_entry_script_runs_a_file_built_on_a_preset(tmp_path, capsys):
    from engine.pretrain import main

    (tmp_path / "mine.yaml").write_text("base: tiny_cpu\ntrain:\n  lr: 0.25\n")
    assert main(["--print-config", "--config", str(tmp_path / "mine.yaml")]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.25" in out and "hidden_size: 64" in out, out
