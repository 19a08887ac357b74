import json
import os

import pytest

from engine import checkpoint, checkpoint_model


def test_latest_skips_partial_and_incomplete(tmp_path):
    done = tmp_path / "step_00000003"
    done.mkdir()
    (done / checkpoint.STATE_FILE).write_text(json.dumps({"step": 3}))
    (tmp_path / "step_00000006.partial").mkdir()  # killed mid-save
    (tmp_path / "step_00000005").mkdir()  # no trainer state: never completed
    assert checkpoint.latest(str(tmp_path)) == str(done)
    (tmp_path / checkpoint.LATEST).write_text("step_00000003")
    assert checkpoint.latest(str(tmp_path)) == str(done)


def test_a_step_being_deleted_is_not_taken_even_when_named(tmp_path):
    """A replaced or pruned step is renamed step_N.deleting and then removed file by file: named by
    hand (checkpoint.init_from, polar score --checkpoint) while its state file was still there it was
    taken as a step, and its half-deleted weights then failed to load as 'damaged'."""
    done = _step(tmp_path, 3)
    going = _step(tmp_path, 5)
    going.rename(tmp_path / "step_00000005.deleting")
    assert checkpoint.resolve(str(tmp_path)) == str(done)
    with pytest.raises(checkpoint.CheckpointNotFound, match=rf"a step being deleted .* beside it: {done}$"):
        checkpoint.resolve(str(tmp_path / "step_00000005.deleting"))


def test_latest_on_empty_dir(tmp_path):
    assert checkpoint.latest(str(tmp_path / "nothing")) is None


def _step(root, n, state=None):
    d = root / f"step_{n:08d}"
    d.mkdir(parents=True)
    (d / checkpoint.STATE_FILE).write_text(json.dumps(state or {"step": n}))
    (d / checkpoint.MEGATRON_FILE).write_text("{}")  # without it the step is an incomplete copy
    return d


def test_pruning_keeps_the_step_just_saved_and_deletes_only_older_ones(tmp_path):
    """Another run's step 4 in the directory, this run's step 2 just saved with keep=1: pruning by
    name alone deleted step 2, and resume then took the other run's step 4."""
    other = _step(tmp_path, 4)
    older = [_step(tmp_path, 1), _step(tmp_path, 0)]
    saved = _step(tmp_path, 2)
    (tmp_path / checkpoint.LATEST).write_text(saved.name)
    checkpoint._prune(tmp_path, 1, saved)
    assert saved.is_dir() and other.is_dir() and not any(p.exists() for p in older)
    assert checkpoint.latest(str(tmp_path)) == str(saved)
    checkpoint._prune(tmp_path, 0, saved)  # keep=0: all
    assert other.is_dir()


def test_pruning_keeps_keep_steps_up_to_the_saved_one(tmp_path):
    steps = [_step(tmp_path, n) for n in (1, 2, 3)]
    checkpoint._prune(tmp_path, 2, steps[-1])
    assert [p.is_dir() for p in steps] == [False, True, True]


@pytest.mark.parametrize("field,saved,now", [("add_qkv_bias", False, True),
                                             ("transformer_impl", "transformer_engine", "local"),
                                             ("hidden_size", 64, 128)])
def test_a_model_setting_that_changes_which_weights_exist_is_named(tmp_path, field, saved, now):
    """A checkpoint whose model has other weights (another shape, q/k/v biases, TE's fused norms)
    is refused with the setting to change, not a missing-key error from inside the load."""
    import dataclasses

    from engine.config import ConfigError, ModelConfig

    step = tmp_path / "step_00000003"
    step.mkdir()
    (step / checkpoint.MODEL_FILE).write_text(json.dumps({**dataclasses.asdict(ModelConfig()), field: saved}))
    checkpoint_model.check_model_matches(ModelConfig(**{field: saved}), str(step), f"checkpoint.init_from={step}")
    with pytest.raises(ConfigError, match=f"checkpoint.init_from={step} holds a model with model.{field}={saved}.*"
                                          f"but this run has model.{field}={now}"):
        checkpoint_model.check_model_matches(ModelConfig(**{field: now}), str(step), f"checkpoint.init_from={step}")


def test_a_converters_model_yaml_is_read_and_checked(tmp_path):
    """`polar convert hf-to-engine` writes model.yaml beside its step as a run config's `model:`
    section: read as the settings themselves it was refused ("unknown setting 'model.model'") by
    polar score/eval/serve, and a mismatched init_from passed unchecked."""
    from engine.config import ConfigError, ModelConfig
    from polar.convert.engine_io import write_model_yaml

    step = tmp_path / "ckpt" / "step_00000000"
    step.mkdir(parents=True)
    write_model_yaml(step.parent / "model.yaml", ModelConfig(hidden_size=64, num_layers=2, vocab_size=300))
    assert checkpoint_model.model_config(str(step)) == ModelConfig(hidden_size=64, num_layers=2, vocab_size=300)
    with pytest.raises(ConfigError, match="model.hidden_size=64 .*but this run has model.hidden_size=128"):
        checkpoint_model.check_model_matches(ModelConfig(num_layers=2, vocab_size=300), str(step),
                                             f"checkpoint.init_from={step}")
    # a hand-edited model.yaml with a setting given twice: YAML would keep the last without a word, and
    # both readers of the file (a checkpoint's settings, the converter's back-conversion) refuse it
    from polar.convert.engine_io import read_model_config
    from polar.convert.hf_checkpoint import ConvertError

    path = step.parent / "model.yaml"
    path.write_text(path.read_text() + "  num_layers: 4\n")
    with pytest.raises(ConfigError,
                       match=r"model\.yaml: not readable as YAML \(.*line \d+: key 'num_layers' given twice"):
        checkpoint_model.model_config(str(step))
    with pytest.raises(ConvertError, match="key 'num_layers' given twice in one mapping"):
        read_model_config(path)


def test_a_damaged_trainer_state_names_the_file_and_the_step_to_fall_back_to(tmp_path):
    """A truncated trainer_state.json was a JSONDecodeError traceback naming neither the file nor
    what to do; it is a config error naming both (the step before it to resume from)."""
    from engine.config import ConfigError

    before = _step(tmp_path, 4)
    damaged = _step(tmp_path, 6)
    (damaged / checkpoint.STATE_FILE).write_text('{"step": 6, "settings": {"train.lr"')
    (damaged / checkpoint.MODEL_FILE).write_text('{"num_layers": ')
    for read in (checkpoint.read_state, checkpoint_model.saved_model_settings):
        with pytest.raises(ConfigError) as err:
            read(str(damaged))
        msg = str(err.value)
        assert str(damaged) in msg and f"move {damaged} out of {tmp_path}" in msg and str(before) in msg, msg


_REPLACE_STEP = """
import sys
from pathlib import Path
from engine import checkpoint
root = Path(sys.argv[1])
checkpoint._finish_save(root, root / "step_00000004.partial", root / "step_00000004", {"step": 4, "again": True},
                        None, 0)
"""


def test_a_step_saved_again_is_never_half_deleted_under_its_name(tmp_path):
    """A step saved again (a resume from an older one) replaces the step of that name once complete.
    It was deleted file by file under its name first: a kill then left step_N half deleted, its
    trainer_state.json perhaps still there (a step to resolve() and latest()'s fallback that does
    not load). The save's process is stopped (SIGSTOP) as soon as any file of the old step is gone
    from under the name, and what a kill there leaves is looked at: the old step whole, none, or the
    new one."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path / "ckpt"
    old = root / "step_00000004"
    old.mkdir(parents=True)
    (old / checkpoint.STATE_FILE).write_text('{"step": 4}')
    for i in range(5000):  # a deletion long enough to be stopped in
        (old / f"__{i}_0.distcp").write_bytes(b"")
    whole = len(os.listdir(old))
    (root / "step_00000004.partial").mkdir()
    (root / "step_00000004.partial" / checkpoint.STATE_FILE).write_text("{}")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]), OMP_NUM_THREADS="1")
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _REPLACE_STEP, str(root)], env=env, stderr=err)
    try:
        while proc.poll() is None:
            try:
                if len(os.listdir(old)) != whole:
                    break
            except FileNotFoundError:
                break
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGSTOP)
        left = sorted(os.listdir(old)) if old.exists() else None
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode in (0, -signal.SIGKILL), (tmp_path / "stderr").read_text()[-3000:]
    assert left is None or len(left) == whole or json.loads((old / checkpoint.STATE_FILE).read_text()).get("again"), (
        f"{len(left)} of the old step's {whole} files left under its name")


def test_only_step_directories_are_resumed_and_pruned_and_stale_partial_saves_go(tmp_path):
    """A user's copy beside the steps (step_00000002.bak) was deleted by pruning and, named after
    the newest step (step_00000009_old), resumed from; step numbers past 8 digits sorted by name
    before smaller ones; a save cut short at an earlier step (step_N.partial) stayed on disk for good."""
    backup = _step(tmp_path, 2).rename(tmp_path / "step_00000002.bak")
    _step(tmp_path, 2)
    (tmp_path / "notes.txt").write_text("stray file")
    (tmp_path / "step_00000001.partial").mkdir()
    late = _step(tmp_path, 3).rename(tmp_path / "step_00000009_old")
    saved = _step(tmp_path, 4)
    assert checkpoint.latest(str(tmp_path)) == str(saved)  # no marker: the newest by step number
    checkpoint._prune(tmp_path, 1, saved)
    assert backup.is_dir() and late.is_dir() and (tmp_path / "notes.txt").is_file()
    assert not (tmp_path / "step_00000002").exists() and not (tmp_path / "step_00000001.partial").exists()
    # a deletion cut short by a kill: renamed before it began, so never taken for a complete step
    leftover = _step(tmp_path, 0).rename(tmp_path / "step_00000000.deleting")
    assert checkpoint.latest(str(tmp_path)) == str(saved)
    checkpoint._prune(tmp_path, 1, saved)
    assert not leftover.exists()
    (tmp_path / "step_00000005.partial").mkdir()  # a later save that did not finish: not this call's
    checkpoint._prune(tmp_path, 0, saved)
    assert (tmp_path / "step_00000005.partial").is_dir()
    big = _step(tmp_path, 100_000_000)
    _step(tmp_path, 99_999_999)
    assert checkpoint.latest(str(tmp_path)) == str(big)
    assert [p.name for p in checkpoint.partial_saves(tmp_path, after=4)] == ["step_00000005.partial"]


def test_init_from_a_save_that_did_not_finish_says_so(tmp_path):
    """checkpoint.init_from at step_N.partial, or at a run whose only save was cut short, said only
    that the path was not a checkpoint directory."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004.partial").mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointNotFound, match=r"holds only saves that did not finish "
                                                             r"\(step_00000004.partial\)"):
        checkpoint.resolve(str(run))
    done = _step(run / "checkpoints", 2)
    assert checkpoint.resolve(str(run)) == str(done)
    with pytest.raises(checkpoint.CheckpointNotFound, match=f"a save that did not finish .* beside it: {done}"):
        checkpoint.resolve(str(run / "checkpoints" / "step_00000004.partial"))


def test_every_model_setting_that_differs_is_named_in_one_message(tmp_path):
    """Named one at a time, a user who set the first back was refused again for the next."""
    import dataclasses

    from engine.config import ConfigError, ModelConfig

    step = tmp_path / "step_00000003"
    step.mkdir()
    saved = {**dataclasses.asdict(ModelConfig()), "hidden_size": 64, "ffn_hidden_size": 176, "num_layers": 2}
    (step / checkpoint.MODEL_FILE).write_text(json.dumps(saved))
    with pytest.raises(ConfigError) as err:
        checkpoint_model.check_model_matches(ModelConfig(num_layers=2), str(step), f"checkpoint.init_from={step}")
    msg = str(err.value)
    assert (f"checkpoint.init_from={step} holds a model with model.hidden_size=64, model.ffn_hidden_size=176 "
            f"(recorded in {step / checkpoint.MODEL_FILE}), but this run has model.hidden_size=128, "
            "model.ffn_hidden_size=384: set model.hidden_size=64 model.ffn_hidden_size=176") in msg, msg
    assert "num_layers" not in msg, msg


_TINY_MODEL = """
import multiprocessing, sys, warnings
warnings.filterwarnings("ignore")
import torch
from engine import checkpoint, checkpoint_load
from engine.config import EngineConfig
from engine.parallelize import build_model
from engine.runtime import init_runtime
cfg = EngineConfig()
cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 1, 32, 4
cfg.model.num_query_groups, cfg.model.ffn_hidden_size, cfg.model.vocab_size = 2, 64, 260
cfg.parallel.distributed_optimizer = False
rt = init_runtime(cfg.parallel, seed=7)
chunks, _ = build_model(cfg.model, cfg.parallel, cfg.train, rt)
"""
_SAVE_WITHOUT_MAIN_GUARD = _TINY_MODEL + """
path = checkpoint.save(sys.argv[1], 3, chunks, None, {"step": 3})
print("children", len(multiprocessing.active_children()))
before = {k: v.clone() for k, v in chunks[0].state_dict().items() if isinstance(v, torch.Tensor)}
with torch.no_grad():
    for p in chunks[0].parameters():
        p.zero_()
checkpoint_load.load(path, chunks, None)
after = chunks[0].state_dict()
print("same", all(torch.equal(v, after[k]) for k, v in before.items()))
cfg.model.ffn_hidden_size = 96
other, _ = build_model(cfg.model, cfg.parallel, cfg.train, rt)
try:
    checkpoint_load.load(path, other, None)
except checkpoint.CheckpointError as e:
    print("refused", e)
"""


def _run_script(tmp_path, text: str):
    """Runs `text` as a script (its own process: a save initialises torch.distributed) with the
    checkpoint directory tmp_path/ckpt as its argument."""
    import os
    import subprocess
    import sys

    script = tmp_path / "save_script.py"
    script.write_text(text)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def saved_and_loaded(tmp_path_factory):
    """_SAVE_WITHOUT_MAIN_GUARD's output: a step saved and loaded back, then loaded into another model."""
    return _run_script(tmp_path_factory.mktemp("saved_and_loaded"), _SAVE_WITHOUT_MAIN_GUARD).stdout


def test_a_save_starts_no_process_and_needs_no_main_guard(saved_and_loaded):
    """megatron's writer would start a spawn-method Manager for its results on the first save: a
    process re-importing the script (a RuntimeError here, where the script has no __main__ guard)."""
    assert "children 0" in saved_and_loaded and "same True" in saved_and_loaded, saved_and_loaded


def test_a_step_of_another_model_is_not_called_damaged(saved_and_loaded):
    """Loaded into a model of another shape (model.ffn_hidden_size, which a caller of load may not
    have compared), megatron's global shape mismatch was reported as damaged files, advising to move
    a good checkpoint away."""
    refused = next(line for line in saved_and_loaded.splitlines() if line.startswith("refused"))
    assert "does not read back" not in refused, refused
    assert refused.endswith("step_00000003: its tensors have other shapes than this model's (backbone.decoder.layers."
                            "mlp.linear_fc2.weight (1, 32, 64) there, (1, 32, 96) here); the files are not damaged: "
                            "it holds a model of other settings"), refused


_SAVES_RECORDED = _TINY_MODEL + """
import json
from tests.engine.durable_record import record
calls = record()
for step in (3, 5):
    checkpoint.save(sys.argv[1], step, chunks, None, {"step": step}, model_settings={"num_layers": 1})
print(json.dumps(calls))
"""


def test_a_step_is_on_the_disk_before_its_name_and_latest_publish_it(tmp_path):
    """After a power or node failure, a rename that reached the disk (on Lustre or NFS a metadata
    operation, at once) must not name files that did not: every file of the step is fsynced, and
    its directory, before step_N.partial becomes step_N; the checkpoint directory is fsynced after
    it, and only then is `latest` written (fsynced, renamed, the directory fsynced again). Before,
    nothing of trainer_state.json, model.json, metadata.json, the renames or `latest` was fsynced."""
    from tests.engine.durable_record import published_durably

    calls = [tuple(c) for c in json.loads(_run_script(tmp_path, _SAVES_RECORDED).stdout.splitlines()[-1])]
    root = os.path.realpath(tmp_path / "ckpt")
    assert sorted(os.listdir(root)) == ["latest", "step_00000003", "step_00000005"]  # no temporary file left
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000005"
    end = len(calls)
    for step in (5, 3):
        final = f"{root}/step_{step:08d}"
        partial = final + ".partial"
        renamed = calls.index(("replace", partial, final))
        before = set(calls[:renamed])
        files = [os.path.join(partial, os.path.relpath(os.path.join(d, f), final))
                 for d, _, names in os.walk(final) for f in names]
        assert {"trainer_state.json", "model.json", "metadata.json"} <= {os.path.basename(f) for f in files}
        assert [f for f in files if ("fsync", f) not in before] == [], "files renamed into a step before an fsync"
        # the shards are fsynced by megatron's writer, once: not again file by file on rank 0
        shards = [f for f in files if f.endswith(".distcp")]
        assert shards and all(calls[:renamed].count(("fsync", f)) == 1 for f in shards), shards
        assert ("fsync", partial) in before
        marker = published_durably(calls[:end], f"{root}/latest")
        assert renamed < marker and ("fsync", root) in calls[renamed + 1:marker], \
            f"latest written before the rename of {final} was on the disk"
        end = renamed


def test_yarn_settings_round_trip_through_model_json_and_a_resume_may_not_change_them(tmp_path):
    """A step records every yarn setting (model.json; an unset attention factor as null) and reads
    back the model it saved; a resume with any of them changed is refused naming it (it would go on
    training another function), a run started from the weights (shape fields only) may change them."""
    import dataclasses

    from engine.config import ConfigError, ModelConfig

    saved = ModelConfig(vocab_size=300, rope_scaling="yarn", rope_scaling_factor=4.0,
                        rope_original_max_position_embeddings=4096, rope_beta_fast=16.0, rope_beta_slow=2.0,
                        rope_mscale=0.707, rope_mscale_all_dim=1.0, rope_truncate=False)
    step = tmp_path / "step_00000003"
    step.mkdir()
    (step / checkpoint.MODEL_FILE).write_text(json.dumps(dataclasses.asdict(saved)))
    assert checkpoint_model.model_config(str(step)) == saved
    resume = checkpoint_model.SHAPE_FIELDS + checkpoint_model.FUNCTION_FIELDS
    checkpoint_model.check_model_matches(saved, str(step), "the step", fields=resume)
    for name, now in [("rope_beta_fast", 32.0), ("rope_beta_slow", 1.0), ("rope_attention_factor", 1.1),
                      ("rope_mscale", 1.0), ("rope_mscale_all_dim", 0.707), ("rope_truncate", True)]:
        changed = dataclasses.replace(saved, **{name: now})
        with pytest.raises(ConfigError, match=f"the step holds a model with model.{name}=.* but this run has "
                                              f"model.{name}={now}"):
            checkpoint_model.check_model_matches(changed, str(step), "the step", fields=resume)
        checkpoint_model.check_model_matches(changed, str(step), "checkpoint.init_from")


def test_a_freed_models_integrity_check_does_not_pass_to_a_new_model_at_its_address():
    """Only a model's first save gathers every rank's shard metadata to check the sharding; a process
    that builds several models (scoring several checkpoints, a test) frees one and may build the next at
    the same address, whose first save must be checked again."""
    import gc

    class Chunk:  # a stand-in: CPython gives a new instance the address just freed
        # one allocation an instance (no attribute values beside it, which take turns with the instances
        # for the freed blocks), weak references as a model chunk takes
        __slots__ = ("__weakref__",)

    # earlier tests' garbage first: collected after `old` is freed, each freed block of a full memory pool
    # put its pool ahead of old's, and after in-process trainings more than 10,000 instances came before it
    gc.collect()
    old = Chunk()
    checkpoint._SAVES_CHECKED.add(old)  # what save does once its first check passed
    assert checkpoint.integrity_checked([old]) and not checkpoint.integrity_checked([Chunk()])
    address = id(old)
    del old  # no reference cycle: freed here
    kept = []  # instances not at the address, kept alive so that the next one is allocated elsewhere
    for _ in range(1_000_000):
        new = Chunk()
        if id(new) == address:
            break
        kept.append(new)
    else:
        pytest.fail("no new instance was allocated at the freed one's address: the case cannot be made")
    assert not checkpoint.integrity_checked([new])


def test_an_incomplete_copy_of_a_step_is_refused_naming_the_file_it_lacks(tmp_path):
    """A step holding trainer_state.json but not megatron's metadata.json (written when the save finished:
    a cp or rsync that did not finish) was taken by resolve() and latest(), and its load then failed in
    megatron with a traceback ("... is not a distributed checkpoint", exit 1), or a resume's start-up check
    named it damaged. checkpoint.init_from now refuses it at start-up (a config error, exit 2), and so do a
    read of its tensors' metadata and a load of it (a resume from a `latest` naming it), before megatron
    reads anything."""
    from engine import checkpoint_load
    from engine.config_load import load_config
    from polar.pretrain_recipe import PretrainConfig

    done = _step(tmp_path / "ckpt", 3)
    cut = _step(tmp_path / "ckpt", 5)
    (cut / checkpoint.MEGATRON_FILE).unlink()
    lacks = "an incomplete copy of a checkpoint step: it holds trainer_state.json but not metadata.json"
    root = tmp_path / "ckpt"
    for given, said in ((cut, f"{cut}: {lacks}"), (root, f"{root}: its newest step {cut} is {lacks}")):
        with pytest.raises(checkpoint.ConfigError, match=f"checkpoint.init_from={said}.* the newest complete step "
                                                         f"there is then {done}$"):
            load_config(PretrainConfig, None, [f"checkpoint.init_from={given}"])
    assert checkpoint.latest(str(tmp_path / "ckpt")) == str(cut)  # a resume takes it, and its load refuses it
    for read in (lambda: checkpoint_load.load(str(cut), chunks=None, optimizer=object()),
                 lambda: checkpoint_load.has_lm_head(str(cut))):  # a resume's start-up check (aux_lm_weight > 0)
        with pytest.raises(checkpoint.CheckpointError, match=f"^{cut}: {lacks}"):
            read()
    alone = tmp_path / "copied"
    cut.rename(alone)  # a step copied on its own: no step beside it to name
    with pytest.raises(checkpoint.CheckpointNotFound, match=f"{lacks} .*; copy the step again whole$"):
        checkpoint.resolve(str(alone))
    # a converted model's weights (no trainer state) and a complete step are taken as before
    (alone / checkpoint.STATE_FILE).unlink()
    (alone / checkpoint.MEGATRON_FILE).write_text("{}")
    assert checkpoint.resolve(str(alone)) == str(alone)
    assert checkpoint.resolve(str(done)) == str(done)


def test_a_transformers_checkpoint_given_as_a_checkpoint_names_the_converter(tmp_path):
    """checkpoint.init_from (or polar score's --checkpoint) naming a transformers directory (config.json and
    safetensors) or a GGUF file said only 'neither a checkpoint directory ...', leaving the import unsaid."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointNotFound) as e:
        checkpoint.resolve(str(hf))
    assert "hf-to-engine" not in str(e.value)  # config.json alone: no weights to import
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"")
    gguf = tmp_path / "model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    for given, found in ((hf, "a transformers checkpoint (config.json, *.safetensors)"), (gguf, "a GGUF file")):
        with pytest.raises(checkpoint.CheckpointNotFound, match="^neither a checkpoint directory") as e:
            checkpoint.resolve(str(given))
        assert str(e.value).endswith(f"; it is {found}, which the engine does not read: import it with "
                                     f"`polar convert hf-to-engine {given} DST` and give DST"), str(e.value)
