"""A bad value names where it was given: the file and line that set it (in a `base:` chain the file
whose value was kept), or the command line; and load_config reports where every setting came from."""
from __future__ import annotations

import re

import pytest

import polar.presets  # noqa: F401  (registers the presets as `base:` names)
from engine.config import ConfigError
from engine.config_load import load_config
from polar.pretrain_recipe import PretrainConfig


def _error(*args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, *args, **kw)
    return str(e.value)


@pytest.mark.parametrize("text,message", [
    # the reviewer's file: a type error and a range error, below a preset base
    ("base: tiny_cpu\ntrain: {lr: fast}\n", "2: train.lr: expected a number, got 'fast'"),
    ("base: tiny_cpu\nmodel:\n  num_layers: 2\ntrain:\n  steps: 3\n  lr: -1\n", "6: train.lr=-1.0: must be >= 0.0"),
    ("run_dir: 0700\n", "1: run_dir: expected a string"),
    ("checkpoint:\n  init_from: /nonexistent/ckpt\n", "2: checkpoint.init_from=/nonexistent/ckpt:"),
])
def test_a_bad_value_in_a_file_names_the_file_and_line(tmp_path, text, message):
    f = tmp_path / "my.yaml"
    f.write_text(text)
    assert _error(str(f)).startswith(f"{f}:{message}")


def test_in_a_base_chain_the_file_whose_value_is_kept_is_named(tmp_path):
    (tmp_path / "base.yaml").write_text("# the team's defaults\ntrain:\n  steps: 3\n  lr: -1\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  steps: 5\n")
    assert _error(str(tmp_path / "child.yaml")).startswith(f"{tmp_path / 'base.yaml'}:4: train.lr=-1.0: must be")
    # the child's value replaces the base's: the base's bad value is no error, the child's is the child's
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  lr: 0.5\n")
    assert load_config(PretrainConfig, str(tmp_path / "child.yaml")).train.lr == 0.5
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\n\ntrain:\n  lr: slow\n")
    assert _error(str(tmp_path / "child.yaml")).startswith(f"{tmp_path / 'child.yaml'}:4: train.lr: expected a number")


def test_a_base_file_that_needs_a_setting_only_its_child_gives_is_not_refused(tmp_path):
    # checked on its own, the base failed on a value the child replaces
    (tmp_path / "base.yaml").write_text("train:\n  warmup_steps: -5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  warmup_steps: 2\n")
    assert load_config(PretrainConfig, str(tmp_path / "child.yaml")).train.warmup_steps == 2


@pytest.mark.parametrize("override,message", [
    ("train.lr=fast", "command line: train.lr: expected a number, got 'fast'"),
    ("train.lr=-1", "command line: train.lr=-1.0: must be >= 0.0"),
    ("train={lr: -1}", "command line: train.lr=-1.0: must be >= 0.0"),
    ("train=5", "command line: train: expected a mapping of settings, got 5"),
    ("model.num_layers=0", "command line: model.num_layers=0: must be >= 1"),
])
def test_a_bad_value_on_the_command_line_says_so_even_over_a_file(tmp_path, override, message):
    f = tmp_path / "my.yaml"
    f.write_text("train:\n  lr: 0.5\nmodel:\n  num_layers: 2\n")
    assert _error(str(f), [override]) == _error(None, [override])
    assert _error(str(f), [override]).startswith(message)
    # a command-line value replaces a file's bad one
    f.write_text("train:\n  lr: fast\n")
    assert load_config(PretrainConfig, str(f), ["train.lr=0.25"]).train.lr == 0.25


def test_a_default_value_is_named_without_a_source():
    from polar.finetune_recipe import FinetuneConfig

    with pytest.raises(ConfigError, match=r"^finetune\.train: name the training records"):
        load_config(FinetuneConfig, None, [])


def test_the_entry_script_prints_the_file_and_line(tmp_path, capsys):
    from engine.pretrain import main

    f = tmp_path / "my.yaml"
    f.write_text("base: tiny_cpu\ntrain: {lr: fast}\n")
    assert main(["--check-config", "--config", str(f)]) == 2
    assert capsys.readouterr().err == f"config error: {f}:2: train.lr: expected a number, got 'fast'\n"


def test_sources_name_the_file_line_preset_or_command_line(tmp_path):
    from engine.config_load import Source, set_by_user

    (tmp_path / "base.yaml").write_text("base: tiny_cpu\ntrain:\n  lr: 0.5\n")
    f = tmp_path / "my.yaml"
    f.write_text("base: base.yaml\nmodel:\n  num_layers: 3\n")
    sources: dict = {}
    cfg = load_config(PretrainConfig, str(f), ["train.steps=7", "data={seq_length: 256}"], sources=sources)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.lr, cfg.train.steps) == (3, 64, 0.5, 7)
    assert str(sources["model.num_layers"]) == f"{f}:3"
    assert str(sources["train.lr"]) == f"{tmp_path / 'base.yaml'}:3"
    assert sources["train.steps"] == Source() and str(sources["data.seq_length"]) == "command line"
    assert re.fullmatch(r".*tiny_cpu\.yaml:\d+", str(sources["model.hidden_size"]))
    # the user's files and command line set a value; a preset's value is not the user's choice
    assert [set_by_user(sources, k) for k in ("model.num_layers", "train.lr", "train.steps", "data.seq_length",
                                              "model.hidden_size", "model.num_query_groups", "log.interval")] == \
        [True, True, True, True, False, False, False]
    # --config with a preset's name: all of it is the preset's
    preset: dict = {}
    load_config(PretrainConfig, polar.presets.resolve_config("tiny_cpu"), sources=preset)
    assert preset and not any(set_by_user(preset, k) for k in preset)
