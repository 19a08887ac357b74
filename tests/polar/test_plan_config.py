"""The run settings `polar plan` plans for (polar/plan_config.py): what a run derives at start-up, the plan
derives as the run does: the model of the checkpoint it loads, its tokenizer's vocabulary, and
fine-tuning's pack length from its records."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polar import plan

ROOT = Path(__file__).resolve().parents[2]


def test_a_fine_tuning_config_without_a_vocabulary_size_is_asked_for_one(tmp_path, capsys):
    f = tmp_path / "ft.yaml"
    f.write_text("finetune:\n  tokenizer: byte\n")
    (tmp_path / "child.yaml").write_text("base: ft.yaml\n")
    for config in (f, tmp_path / "child.yaml"):
        assert plan.main(["--config", str(config), "--gpus", "2"]) == 2
        err = capsys.readouterr().err
        assert "model.vocab_size=0: fine-tuning takes it from its tokenizer" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A run directory holding a real checkpoint the engine saved: 3 layers, hidden 64, 4 heads, 2 KV groups,
    FFN 176, vocabulary 260 (the byte tokenizer's), none of them EngineConfig's defaults but the heads."""
    run = tmp_path_factory.mktemp("plan_run") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "tests.polar.serve.make_checkpoint", str(run), "3", "64", "4", "2", "176",
                    "260"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=600)
    return run


SMALL_RUN_SHAPE = "3 layers, hidden 64, 4 heads, 2 KV groups, FFN 176, vocab 260)"


@pytest.mark.parametrize("given", ["", "model:\n  vocab_size: 260\n"], ids=["vocab-from-checkpoint", "vocab-given"])
def test_a_fine_tuning_config_plans_the_model_of_its_init_checkpoint(tmp_path, small_run, given, capsys):
    """A fine-tuning run builds the model recorded with checkpoint.init_from (engine.start_checks.
    model_from_checkpoint); the plan was asked for model.vocab_size, and given one planned EngineConfig's
    default model (hidden 128, 4 layers): a converted 7B would have been planned as ~1M parameters."""
    f = tmp_path / "ft.yaml"
    f.write_text(f"finetune:\n  train: prefs.jsonl\ncheckpoint:\n  init_from: {small_run / 'checkpoints'}\n"
                 f"data:\n  seq_length: 1024\n{given}")
    assert plan.main(["--config", str(f), "--gpus", "2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert SMALL_RUN_SHAPE in out, out
    assert out.startswith(f"model settings from {small_run / 'config.yaml'}: model.num_layers=3, "
                          "model.hidden_size=64, "), out


def _tokenizer_recorded_as_zero(small_run, run: Path) -> Path:
    shutil.copytree(small_run, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("vocab_size: 260", "vocab_size: 0"))
    return run


def test_a_checkpoint_recording_the_tokenizers_vocabulary_is_planned_with_that_tokenizers(tmp_path, small_run,
                                                                                          capsys):
    """model.vocab_size recorded as 0 (the tokenizer's): fine-tuning takes the vocabulary of the tokenizer the
    checkpoint was trained with (polar.checkpoint_tokenizer.find: the byte tokenizer of this run)."""
    from polar.tokenizer import ByteTokenizer

    run = _tokenizer_recorded_as_zero(small_run, tmp_path / "run")
    f = tmp_path / "ft.yaml"
    f.write_text(f"finetune:\n  train: prefs.jsonl\ncheckpoint:\n  init_from: {run}\ndata:\n  seq_length: 1024\n")
    assert plan.main(["--config", str(f), "--gpus", "2"]) == 0, capsys.readouterr().err
    assert f"FFN 176, vocab {ByteTokenizer.vocab_size})" in capsys.readouterr().out


def _as_file(settings: list[str]) -> str:
    """section.key=value settings as the YAML file that gives them."""
    tree: dict = {}
    for item in settings:
        key, value = item.split("=", 1)
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = yaml.safe_load(value)
    return yaml.safe_dump(tree)


def _finetune_cfg(yaml_file: Path):
    """The fine-tuning run's settings from the same file, as engine/finetune.py loads them."""
    from engine.config_load import load_config
    from polar.finetune_recipe import FinetuneConfig

    return load_config(FinetuneConfig, str(yaml_file), [])


def test_a_checkpoint_of_an_unknown_tokenizer_is_planned_with_finetune_tokenizer(tmp_path, small_run, capsys,
                                                                                  monkeypatch):
    """A step whose model.json records vocab_size 0 and that names no tokenizer (no tokenizer/ beside it, no
    run config.yaml): the run takes finetune.tokenizer's vocabulary; the plan refused, asking for
    model.vocab_size, as if finetune.tokenizer were not there."""
    from polar.finetune_recipe import tokenizer_spec
    from polar.tokenizer import load_tokenizer
    from tests.polar.convert.tiny_models import write_tokenizer

    run = _tokenizer_recorded_as_zero(small_run, tmp_path / "run")
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]
    (run / "config.yaml").unlink()
    step = run / "checkpoints" / "step_00000000"
    (step / "model.json").write_text(json.dumps(model))
    vocab = write_tokenizer(tmp_path / "tok")
    f = tmp_path / "ft.yaml"
    f.write_text(f"finetune:\n  train: prefs.jsonl\n  tokenizer: {tmp_path / 'tok'}\ncheckpoint:\n  init_from: {step}\n"
                 "data:\n  seq_length: 1024\n")
    assert plan.main(["--config", str(f), "--gpus", "2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"FFN 176, vocab {vocab})" in out and vocab != 260, out
    (tmp_path / "prefs.jsonl").write_text("{}\n")  # the run's settings check wants the file to exist
    monkeypatch.chdir(tmp_path)
    assert load_tokenizer(tokenizer_spec(_finetune_cfg(f))).vocab_size == vocab  # the run's own resolution


def test_a_tokenizer_the_run_refuses_is_refused(tmp_path, small_run, capsys, monkeypatch):
    """finetune.tokenizer giving other ids than the init checkpoint's own: the run refuses it
    (polar.checkpoint_tokenizer.choose); the plan planned the checkpoint tokenizer's vocabulary instead."""
    from engine.config import ConfigError
    from polar.finetune_recipe import tokenizer_spec
    from tests.polar.convert.tiny_models import write_tokenizer

    run = _tokenizer_recorded_as_zero(small_run, tmp_path / "run")
    write_tokenizer(tmp_path / "tok")
    (tmp_path / "prefs.jsonl").write_text("{}\n")
    f = tmp_path / "ft.yaml"
    f.write_text(f"finetune:\n  train: prefs.jsonl\n  tokenizer: {tmp_path / 'tok'}\ncheckpoint:\n  init_from: {run}\n"
                 "data:\n  seq_length: 1024\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        tokenizer_spec(_finetune_cfg(f))
    assert plan.main(["--config", str(f), "--gpus", "2"]) == 2
    assert capsys.readouterr().err == f"polar plan: model.vocab_size=0: fine-tuning takes it from its tokenizer: " \
                                      f"{refused.value}\n"


def test_a_resumed_run_is_planned_with_its_checkpoints_model(tmp_path, small_run, capsys):
    # the run resumes from its newest step (checkpoint.resume=true, the default) and builds that step's model
    assert plan.main(["--config", "tiny_cpu", "--gpus", "2", f"run_dir={small_run}"]) == 0, capsys.readouterr().err
    assert SMALL_RUN_SHAPE in capsys.readouterr().out


def _records(path: Path, chosen_lengths) -> Path:
    rows = [{"prompt": f"question {i}", "reference": "a good answer", "chosen": "c" * n, "rejected": "x" * 40}
            for i, n in enumerate(chosen_lengths)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("how", ["file", "file-zero", "command-line"])
@pytest.mark.parametrize("held", [False, True], ids=["split", "eval-file"])
def test_a_fine_tuning_length_that_follows_the_data_is_the_runs(tmp_path, small_run, how, held, capsys, monkeypatch):
    """Fine-tuning's data.seq_length, left out (or 0), follows the data: the run packs the longest record in
    whole 256-token units (2048 here, a 1,880-character response). The plan planned EngineConfig's 1024
    (half the activations) when a file left it out, refused a 0, and planned polar_7b's 16384 for settings
    given on the command line alone (polar finetune starts from no preset)."""
    from engine.config_load import load_config
    from polar import finetune_recipe

    train = _records(tmp_path / "prefs.jsonl", [30, 60] if held else [30, 1880, 50])
    settings = [f"finetune.train={train}", "finetune.tokenizer=byte", "finetune.eval_fraction=0",
                f"checkpoint.init_from={small_run / 'checkpoints'}", "train.global_batch=1",
                f"run_dir={tmp_path / 'ft'}"]
    if held:
        settings.append(f"finetune.eval={_records(tmp_path / 'held.jsonl', [1880])}")
    if how == "file-zero":
        settings.append("data.seq_length=0")
    f = tmp_path / "ft.yaml"
    config, overrides = (None, settings) if how == "command-line" else (f, [])
    f.write_text(_as_file(settings))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(finetune_recipe.FinetuneConfig, config and str(config), overrides)  # as the run loads it
    finetune_recipe.prepare_data(cfg)  # what the run packs
    ran = capsys.readouterr().out
    assert cfg.data.seq_length == 2048
    assert plan.main([*(["--config", str(config)] if config else []), "--gpus", "2", *overrides]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"1 packed sequences x {cfg.data.seq_length} tokens per step" in out, out
    said = re.search(r"^data.seq_length=2048 from the data: .*$", out, re.M)
    assert said and said.group(0) in ran, out


def test_a_length_the_fine_tuning_file_sets_is_kept(tmp_path, small_run, capsys):
    train = _records(tmp_path / "prefs.jsonl", [30, 1880, 50])
    f = tmp_path / "ft.yaml"
    f.write_text(f"finetune:\n  train: {train}\n  tokenizer: byte\ncheckpoint:\n  init_from: {small_run}\n"
                 "train:\n  global_batch: 1\ndata:\n  seq_length: 4096\n")
    assert plan.main(["--config", str(f), "--gpus", "2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "x 4096 tokens per step" in out and "from the data" not in out, out


@pytest.mark.parametrize("train, why", [
    ("", "finetune.train is not given"),
    ("/no/such/prefs.jsonl", "finetune.train=/no/such/prefs.jsonl: no such file here"),
])
def test_a_fine_tuning_length_without_its_data_is_asked_for(tmp_path, train, why, capsys):
    f = tmp_path / "ft.yaml"
    f.write_text(f"finetune:\n  tokenizer: byte\n  train: '{train}'\nmodel:\n  vocab_size: 300\n")
    assert plan.main(["--config", str(f), "--gpus", "2"]) == 2
    assert capsys.readouterr().err == (
        f"polar plan: fine-tuning's data.seq_length follows the data, which the plan reads to find it ({why}): give "
        "data.seq_length=N, the length a run prints as `data.seq_length=N from the data` (the longest record as one "
        "group, in whole 256-token units, at least 1024)\n")


def test_a_fine_tuning_plan_resumes_from_fine_tunings_run_dir_not_pre_trainings(tmp_path, small_run, capsys,
                                                                                 monkeypatch):
    """Fine-tuning's run_dir defaults to runs/finetune. The plan looked for a step to resume in
    EngineConfig's runs/default, which the quick start's pre-training run fills, and so planned that run's
    model instead of checkpoint.init_from's (found following the README: the quick start, then a plan of
    fine-tuning a converted checkpoint)."""
    monkeypatch.chdir(tmp_path)
    pretrained = tmp_path / "runs" / "default"
    shutil.copytree(small_run, pretrained)
    config = pretrained / "config.yaml"
    config.write_text(config.read_text().replace("num_layers: 3", "num_layers: 2"))  # a model of another shape
    settings = [f"checkpoint.init_from={small_run / 'checkpoints'}", "finetune.train=prefs.jsonl",
                "data.seq_length=1024", "--gpus", "2"]
    assert plan.main(settings) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert SMALL_RUN_SHAPE in out and str(pretrained) not in out, out
    assert out.startswith(f"model settings from {small_run / 'config.yaml'}: model.num_layers=3, "), out

    fine_tuned = tmp_path / "runs" / "finetune"  # the fine-tuning run's own steps: it resumes them
    shutil.copytree(pretrained, fine_tuned)
    assert plan.main(settings) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith(f"model settings from {fine_tuned.relative_to(tmp_path) / 'config.yaml'}: "
                          "model.num_layers=2, "), out
