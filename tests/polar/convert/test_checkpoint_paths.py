"""`polar convert engine-to-hf SRC` takes every checkpoint path `polar score/eval/serve --checkpoint` and
checkpoint.init_from take, and reads the model settings recorded with it as they do (engine.checkpoint's
resolve, engine.checkpoint_model's saved_model_settings): it used to refuse a run directory
(`runs/default`) and a checkpoints directory without a `latest` marker, and to look for a model.yaml or
config.yaml only, so checkpoints kept away from their run (checkpoint.dir) needed --config though their
steps record the model.

Every file a conversion writes, in either direction, has the mode a new file gets (0666 less the umask):
safetensors' save_file left the weights 0600, unreadable by a server running as another user (a vLLM or
SGLang container) or by a teammate on shared storage.

The run is engine/pretrain.py's embedded default (byte tokenizer), tiny, two steps, each saved.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="pip install transformers safetensors")

from polar.convert import engine_to_hf, hf_to_engine  # noqa: E402
from polar.convert.hf_checkpoint import ConvertError  # noqa: E402
from tests.polar.convert import tiny_models as tm  # noqa: E402
from tests.polar.convert.helpers import ROOT  # noqa: E402

RUN = ["train.steps=2", "checkpoint.save_interval=1", "synthetic.train_triplets=64", "synthetic.eval_triplets=20",
       "synthetic.prompts=50", "log.tensorboard=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A training run's directory: config.yaml, checkpoints/{latest, step_00000001, step_00000002}."""
    run_dir = tmp_path_factory.mktemp("paths") / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "engine" / "pretrain.py"), f"run_dir={run_dir}", *RUN],
                          capture_output=True, text=True, timeout=900, cwd=run_dir.parent,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    return run_dir


def _convert(src, dst, **kw) -> Path:
    """engine_to_hf.convert; returns the step it said it converted."""
    said = []
    engine_to_hf.convert(src, dst, log=said.append, **kw)
    return Path(said[-1].rsplit("from ", 1)[1].rstrip(")"))


def _weights(dst: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(dst / "model.safetensors"))


def _same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def steps(run, tmp_path_factory) -> dict:
    """Each step's weights exported from its own step directory (the path the old code took too)."""
    out = tmp_path_factory.mktemp("steps")
    found = {}
    for n in (1, 2):
        step = run / "checkpoints" / f"step_{n:08d}"
        assert _convert(step, out / str(n)) == step
        found[n] = _weights(out / str(n))
    assert not _same_weights(found[1], found[2])  # training moved the weights: the tests below tell them apart
    return found


@pytest.mark.parametrize("form", ["run", "checkpoints", "step"])
def test_every_path_score_takes_converts_that_step(run, steps, tmp_path, form):
    """`runs/default` was refused ("neither a checkpoint directory ... nor one step directory")."""
    from engine import checkpoint

    src = {"run": run, "checkpoints": run / "checkpoints", "step": run / "checkpoints" / "step_00000002"}[form]
    assert checkpoint.resolve(str(src)) == str(run / "checkpoints" / "step_00000002")
    assert _convert(src, tmp_path / "hf") == run / "checkpoints" / "step_00000002"
    assert _same_weights(_weights(tmp_path / "hf"), steps[2])


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


@pytest.mark.parametrize("form", ["run", "checkpoints"])
def test_without_latest_the_newest_complete_step_is_converted(run, steps, tmp_path, form):
    """A checkpoints directory whose `latest` is gone (copied without it, say) was refused."""
    copy = _copy(run, tmp_path)
    (copy / "checkpoints" / "latest").unlink()
    src = copy if form == "run" else copy / "checkpoints"
    assert _convert(src, tmp_path / "hf") == copy / "checkpoints" / "step_00000002"
    assert _same_weights(_weights(tmp_path / "hf"), steps[2])


def test_latest_naming_a_missing_step_falls_back_to_the_newest_complete_one(run, steps, tmp_path):
    """As resolve does (a step pruned or moved away after `latest` was written): the run directory's."""
    from engine import checkpoint

    copy = _copy(run, tmp_path)
    shutil.rmtree(copy / "checkpoints" / "step_00000002")
    (copy / "checkpoints" / "latest").write_text("step_00000002")
    assert checkpoint.resolve(str(copy)) == str(copy / "checkpoints" / "step_00000001")
    assert _convert(copy, tmp_path / "hf") == copy / "checkpoints" / "step_00000001"
    assert _same_weights(_weights(tmp_path / "hf"), steps[1])


def test_a_directory_of_unfinished_saves_is_named_as_such(run, tmp_path, capsys):
    """Only `step_N.partial` directories (every save cut short): said so, with their names."""
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints" / "step_00000001", ckpts / "step_00000001.partial")
    capsys.readouterr()
    assert engine_to_hf.main([str(ckpts), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"polar convert engine-to-hf: {ckpts}: ") and err.count("\n") == 1, err
    assert "holds only saves that did not finish (step_00000001.partial)" in err, err
    with pytest.raises(ConvertError, match=r"a save that did not finish .* the newest complete one beside it: none"):
        engine_to_hf.convert(ckpts / "step_00000001.partial", tmp_path / "hf", log=lambda *a: None)
    assert not (tmp_path / "hf").exists()


def test_checkpoints_kept_away_from_the_run_read_the_model_recorded_in_the_step(run, steps, tmp_path):
    """checkpoint.dir outside the run directory: no model.yaml or config.yaml beside the steps, whose
    model.json `polar score` reads; the conversion asked for --config. The tokenizer is named (the run's
    config.yaml, which says it, is elsewhere), as score needs it named too."""
    from engine import checkpoint_model

    ckpts = tmp_path / "scratch" / "ckpts"
    shutil.copytree(run / "checkpoints", ckpts)
    step = ckpts / "step_00000002"
    assert checkpoint_model.model_config(str(step)).hidden_size > 0  # what score, eval and serve read
    assert _convert(ckpts, tmp_path / "hf", tokenizer="byte") == step
    assert _same_weights(_weights(tmp_path / "hf"), steps[2])


def test_no_recorded_model_asks_for_config(run, tmp_path):
    ckpts = tmp_path / "ckpts"
    shutil.copytree(run / "checkpoints" / "step_00000001", ckpts / "step_00000001")
    (ckpts / "step_00000001" / "model.json").unlink()
    with pytest.raises(ConvertError, match=r"step_00000001: no model settings recorded with it .* pass --config"):
        engine_to_hf.convert(ckpts, tmp_path / "hf", tokenizer="byte", log=lambda *a: None)
    engine_to_hf.convert(ckpts, tmp_path / "hf", tokenizer="byte", config=str(run / "config.yaml"),
                         log=lambda *a: None)


def _modes(root: Path) -> dict:
    """Every file and directory under `root` (itself included): its permission bits."""
    return {str(p.relative_to(root.parent)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def _umask(mask: int):
    old = os.umask(mask)

    def restore():
        os.umask(old)

    return restore


@pytest.mark.parametrize("mask", [0o022, 0o007])
def test_every_file_a_conversion_writes_has_a_new_files_mode(run, tmp_path, monkeypatch, mask):
    """engine-to-hf in several shards and in one, from a source tokenizer readable by its owner only
    (its copy is the export's own file), and hf-to-engine: files 0666 and directories 0777 less the umask.
    The weights were 0600 (safetensors writes a temporary file made so and renames it) and the tokenizer
    files kept their source's mode."""
    src = tm.save(tm.random_seq_cls(tm.llama_config("llama")), tmp_path / "src")
    for f in (src / "tokenizer.json", src / "tokenizer_config.json"):
        f.chmod(0o600)
    restore = _umask(mask)
    try:
        engine = hf_to_engine.convert(src, tmp_path / "engine", tokenizer=str(src), log=lambda *a: None)
        written = [_modes(engine)]
        for f in (engine / "tokenizer").iterdir():
            f.chmod(0o600)
        written.append(_modes(engine_to_hf.convert(engine, tmp_path / "whole", log=lambda *a: None)))
        monkeypatch.setattr(engine_to_hf, "SHARD_BYTES", 100_000)
        written.append(_modes(engine_to_hf.convert(run, tmp_path / "sharded", log=lambda *a: None)))
    finally:
        restore()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    for modes in written:
        want = {name: (0o777 if (tmp_path / name).is_dir() else 0o666) & ~mask for name in modes}
        assert modes == want, {name: oct(m) for name, m in modes.items() if m != want[name]}
