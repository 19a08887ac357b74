import re

import pytest

from engine.config import ConfigError, EngineConfig, ModelConfig, ParallelConfig, TrainConfig
from engine.config_load import load_config
from engine.runtime import validate_layout


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 5.0e-4\nmodel:\n  num_layers: 8\n")
    cfg = load_config(EngineConfig, str(f), ["train.lr=1e-5", "parallel.tp=2", "parallel.vpp=null"])
    assert cfg.train.lr == 1e-5 and cfg.model.num_layers == 8 and cfg.parallel.tp == 2
    assert cfg.parallel.vpp is None and cfg.train.steps == TrainConfig().steps


def test_base_file_is_inherited(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  hidden_size: 256\n  num_layers: 6\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  num_layers: 12\n")
    cfg = load_config(EngineConfig, str(tmp_path / "child.yaml"))
    assert cfg.model.hidden_size == 256 and cfg.model.num_layers == 12


@pytest.mark.parametrize("override,needle", [
    (["train.learning_rate=1"], "train.learning_rate"),
    (["optim.lr=1"], "optim"),
    (["train.steps=many"], "train.steps"),
    (["parallel.distributed_optimizer=maybe"], "parallel.distributed_optimizer"),
    (["train.lr"], "train.lr"),
])
def test_bad_settings_name_themselves(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(EngineConfig, None, override)


@pytest.mark.parametrize("model,par,train,world,needle", [
    (dict(num_attention_heads=6, num_query_groups=2, hidden_size=96), dict(tp=4), {}, 4, "parallel.tp=4"),
    ({}, dict(tp=2), {}, 3, "world size 3"),
    (dict(num_layers=3), dict(pp=2), {}, 2, "model.num_layers=3"),
    ({}, dict(pp=2, vpp=2), dict(global_batch=3), 2, "multiple of parallel.pp"),
    ({}, {}, dict(global_batch=6, micro_batch=4), 2, "train.global_batch=6"),
    (dict(num_query_groups=3), {}, {}, 1, "model.num_query_groups=3"),
])
def test_impossible_layouts_stop_with_the_setting(model, par, train, world, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate_layout(ModelConfig(**model), ParallelConfig(**par), TrainConfig(**train), world, 1024)


@pytest.mark.parametrize("par,seq_length,needle", [
    (dict(sequence_parallel=True), 64, "parallel.sequence_parallel=true needs parallel.tp > 1 (got parallel.tp=1)"),
    (dict(tp=2, sequence_parallel=True), 63,
     "parallel.sequence_parallel=true needs data.seq_length=63 divisible by parallel.tp=2"),
])
def test_sequence_parallel_refusals_name_the_settings(par, seq_length, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate_layout(ModelConfig(), ParallelConfig(**par), TrainConfig(), 2, seq_length)


def test_sequence_parallel_accepted_with_tp_dividing_the_sequence():
    assert validate_layout(ModelConfig(), ParallelConfig(tp=2, sequence_parallel=True), TrainConfig(), 4, 64) == 2
    # without sequence parallelism the sequence length is not constrained by tp
    assert validate_layout(ModelConfig(), ParallelConfig(tp=2), TrainConfig(), 2, 63) == 1


# ---- command-line strings, YAML scalars, base: chains ----

@pytest.mark.parametrize("text", ["20240101_1230", "0700", "12:30", "1.10", "0x1f", "yes", "off", "1e3", "null", "[x"])
def test_a_string_setting_takes_the_command_line_text_as_typed(text):
    # YAML 1.1 reads these as 202401011230, 448, 750, 1.1, 31, True, False, 1000.0 and None, and refuses [x
    cfg = load_config(EngineConfig, None, [f"run_dir={text}", f"checkpoint.dir={text}"])
    assert cfg.run_dir == text and cfg.checkpoint.dir == text


def test_other_settings_still_read_the_command_line_as_yaml():
    cfg = load_config(EngineConfig, None, ["model.num_layers=0x10", "train.lr=1e-5", "parallel.vpp=null",
                                           "log.tensorboard=no", "train.fp8=off"])
    assert cfg.model.num_layers == 16 and cfg.train.lr == 1e-5 and cfg.parallel.vpp is None
    assert cfg.log.tensorboard is False and cfg.train.fp8 == "off"
    assert load_config(EngineConfig, None, ["train.fp8=false"]).train.fp8 == "off"  # false_means


@pytest.mark.parametrize("overrides", [
    ["train.steps=10", "train={lr: 0.5}"], ["train={lr: 0.5}", "train.steps=10"],
    ["train={lr: 0.5}", "train={steps: 10}"], ["train={steps: 10, lr: 0.1}", "train.lr=0.5"],
])
def test_a_section_given_as_a_mapping_on_the_command_line_sets_its_keys_only(overrides):
    """`train={lr: 0.5}` replaced the whole section, so a `train.steps=10` before it was dropped without
    a word; a setting given twice still takes the last (wrappers append their defaults' overrides)."""
    cfg = load_config(EngineConfig, None, overrides)
    assert (cfg.train.steps, cfg.train.lr) == (10, 0.5)


def test_an_optional_string_setting_takes_the_text_or_null():
    from typing import Optional

    from engine.config_load import parse_overrides

    tree = parse_overrides(["a=0700", "b=null"])
    assert tree["a"].resolve(Optional[str]) == "0700" and tree["b"].resolve(Optional[str]) is None
    assert tree["a"].resolve(int) == 448  # a number setting gets YAML's reading (0700 is octal in YAML 1.1)


@pytest.mark.parametrize("text,read_as", [("0700", "int 448"), ("12:30", "int 750"), ("1.10", "float 1.1"),
                                          ("yes", "bool True"), ("2024-01-01", "date")])
def test_an_unquoted_yaml_value_yaml_rewrites_is_refused_for_a_string_setting(tmp_path, text, read_as):
    f = tmp_path / "c.yaml"
    f.write_text(f"run_dir: {text}\n")
    with pytest.raises(ConfigError, match=re.escape(f"run_dir: expected a string, but the YAML value was read as "
                                                    f"{read_as}") + r".*quote it"):
        load_config(EngineConfig, str(f))
    f.write_text(f"run_dir: '{text}'\n")
    assert load_config(EngineConfig, str(f)).run_dir == text


def test_a_base_cycle_is_named(tmp_path):
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*self\.yaml -> .*self\.yaml"):
        load_config(EngineConfig, str(tmp_path / "self.yaml"))
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(EngineConfig, str(tmp_path / "a.yaml"))


def test_an_empty_base_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("base:\n")
    with pytest.raises(ConfigError, match=r"base=None: expected the path of another config file, or a preset.s name"):
        load_config(EngineConfig, str(tmp_path / "c.yaml"))


def test_the_entry_script_prints_one_config_error_line_for_a_cycle(tmp_path, capsys):
    from engine.pretrain import main

    (tmp_path / "cyc.yaml").write_text("base: cyc.yaml\n")
    assert main(["--print-config", "--config", str(tmp_path / "cyc.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and "cycle" in err and len(err.strip().splitlines()) == 1, err


def test_the_entry_script_prints_a_command_line_string_as_typed(capsys):
    from engine.pretrain import main

    assert main(["--print-config", "run_dir=20240101_1230"]) == 0
    assert "run_dir: '20240101_1230'" in capsys.readouterr().out


def test_ignored_sections_are_dropped_from_files_bases_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("recipe_only:\n  x: 1\nmodel:\n  num_layers: 3\n")
    (tmp_path / "c.yaml").write_text("base: base.yaml\nrecipe_only:\n  y: 2\n")
    with pytest.raises(ConfigError, match="unknown setting 'recipe_only'"):
        load_config(EngineConfig, str(tmp_path / "c.yaml"))
    cfg = load_config(EngineConfig, str(tmp_path / "c.yaml"), ["recipe_only.z=3"], ignore=("recipe_only",))
    assert cfg.model.num_layers == 3


@pytest.mark.parametrize("text,value", [("''", ""), ('"0700"', "0700"), ("'a b'", "a b"), ("'x", "'x")])
def test_a_quoted_command_line_string_stands_for_what_it_quotes(text, value):
    assert load_config(EngineConfig, None, [f"checkpoint.dir={text}"]).checkpoint.dir == value
    if value == "":
        with pytest.raises(ConfigError, match="run_dir: must not be empty"):
            load_config(EngineConfig, None, [f"run_dir={text}"])


# ---- a mistake inside a file names the file ----

@pytest.mark.parametrize("text, line, needle", [
    # a near miss is named (it was 'valid keys of train: ' and the 30 keys alone)
    ("model:\n  num_layers: 2\ntrain: {lrr: 1}\n", 3,
     "unknown setting 'train.lrr' (did you mean 'train.lr'?); valid keys of train: adam_beta1, "),
    ("# a comment\nmodle:\n  num_layers: 2\n", 2, "unknown setting 'modle' (did you mean 'model'?); valid keys: "),
    ("train:\n  steps: 5\n  bogus: 1\n", 3, "unknown setting 'train.bogus'; valid keys of train: "),
    # a section indented into another is said to be one (it was no suggestion)
    ("train:\n  steps: 5\n  data:\n    path: ds\n", 3, "unknown setting 'train.data' (there is the section 'data'); "),
    # YAML keeps the last of two `train:` sections without a word: every setting of the first was lost
    ("train:\n  steps: 5\nmodel:\n  num_layers: 2\ntrain:\n  lr: 0.1\n", 5,
     "key 'train' given twice in one mapping"),
    ("train:\n  steps: 5\n  lr: 0.1\n  steps: 6\n", 4, "key 'steps' given twice in one mapping"),
])
def test_a_mistake_in_a_file_names_the_file_and_its_line(tmp_path, text, line, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{f}:{line}: {needle}")):
        load_config(EngineConfig, str(f))


@pytest.mark.parametrize("override, message", [
    ("train.stpes=10", "unknown setting 'train.stpes' (did you mean 'train.steps'?); valid keys of train: "),
    ("trian.steps=10", "unknown setting 'trian' (did you mean 'train'?); valid keys: checkpoint, data, "),
    ("data.seq_len=64", "unknown setting 'data.seq_len' (did you mean 'data.seq_length'?); "),
    ("train.LR=0.1", "unknown setting 'train.LR' (did you mean 'train.lr'?); "),
    # a setting of another section is said to be there, not taken for its own section's near miss
    # (save_interval was 'did you mean 'train.eval_interval'?'); said, not guessed: data.dir is no checkpoint.dir
    ("train.save_interval=5", "unknown setting 'train.save_interval' (there is 'checkpoint.save_interval'); "),
    ("checkpoint.interval=5", "unknown setting 'checkpoint.interval' (there is 'log.interval'); "),
    ("lr=0.1", "unknown setting 'lr' (there is 'train.lr'); valid keys: checkpoint, "),
    ("model.TP=2", "unknown setting 'model.TP' (there is 'parallel.tp'); "),
    ("data.dir=ds", "unknown setting 'data.dir' (there is 'checkpoint.dir'); valid keys of data: "),
    # another setting, not a misspelling of sequence_parallel (difflib's 0.69): no suggestion
    ("parallel.tensor_parallel=2", "unknown setting 'parallel.tensor_parallel'; valid keys of parallel: "),
    ("train.learning_rate=0.1", "unknown setting 'train.learning_rate'; valid keys of train: "),
])
def test_a_misspelt_setting_or_section_names_what_it_most_likely_meant(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(f"command line: {message}")):
        load_config(EngineConfig, None, [override])


def test_a_file_that_is_not_yaml_names_itself_where_pyyaml_said_unicode_string(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError) as e:
        load_config(EngineConfig, str(f))
    assert str(e.value).startswith(f"{f}: not valid YAML: ") and f'in "{f}", line 2, column 10' in str(e.value)
    assert "<unicode string>" not in str(e.value)


def test_a_directory_given_as_a_config_file_is_said_to_be_one(tmp_path):
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path))}: a directory, not a config file$"):
        load_config(EngineConfig, str(tmp_path))


def test_a_key_given_twice_in_a_command_line_mapping_is_refused():
    with pytest.raises(ConfigError, match=re.escape("override 'train={steps: 1, steps: 2}': key 'steps' given "
                                                    "twice in one mapping")):
        load_config(EngineConfig, None, ["train={steps: 1, steps: 2}"])
    assert load_config(EngineConfig, None, ["train={steps: 1, lr: 0.5}"]).train.steps == 1


def test_an_unknown_key_in_a_base_names_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  steps: 3\n  lrr: 1\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'base.yaml'}:3: unknown setting 'train.lrr'")):
        load_config(EngineConfig, str(tmp_path / "child.yaml"))


def test_a_section_that_is_no_mapping_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: 5\n")
    with pytest.raises(ConfigError, match=re.escape(f"{f}:1: train: expected a mapping of settings, got 5")):
        load_config(EngineConfig, str(f))


def test_an_unknown_key_on_the_command_line_names_the_command_line_not_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"^command line: unknown setting 'train\.lrr'"):
        load_config(EngineConfig, str(f), ["train.lrr=1"])


def test_a_missing_base_names_the_file_that_names_it(tmp_path):
    (tmp_path / "c.yaml").write_text("base: nothing_here.yaml\n")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'c.yaml'}: base: nothing_here.yaml: no such "
                                                    f"file ({tmp_path / 'nothing_here.yaml'})")):
        load_config(EngineConfig, str(tmp_path / "c.yaml"))
