"""Fine-tuning's pack length (data.seq_length) follows the data unless the user sets it: a fixed
1024 refused any record over 1k tokens with the default finetune.on_error=fail, records POLAR's own
truncation rule (finetune.max_length 16384, max_response 4096) accepts."""
from __future__ import annotations

import json

import pytest

from engine.config import ConfigError
from engine.config_load import load_config
from polar import finetune_recipe as recipe


def _records(path, chosen_lengths, held=()):
    rows = [{"prompt": f"question {i}", "reference": "a good answer", "chosen": "c" * n, "rejected": "x" * 40}
            for i, n in enumerate(chosen_lengths)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, records, *overrides):
    return load_config(recipe.FinetuneConfig, None, [f"finetune.train={records}", "finetune.tokenizer=byte",
                                                     "finetune.eval_fraction=0", "train.global_batch=1",
                                                     f"run_dir={tmp_path / 'run'}", *overrides])


def test_a_record_over_1k_tokens_trains_at_the_default(tmp_path, capsys):
    """The reviewer's record: a 1,880-character chosen response stopped the run ('do not fit
    data.seq_length=1024 ... raise data.seq_length to 2002')."""
    records = _records(tmp_path / "r.jsonl", [30, 1880, 50])
    cfg = _cfg(tmp_path, records)
    assert cfg.data.seq_length == 0  # --print-config shows it: from the data
    data = recipe.prepare_data(cfg)
    longest = max(len(g) for g in data.train.groups)
    assert cfg.data.seq_length == data.train.seq_length == 2048 and 1792 < longest <= 2048
    assert len(data.train.groups) == 3  # nothing cut or set aside
    out = capsys.readouterr().out
    assert (f"data.seq_length=2048 from the data: the longest record, {records}:2, is {longest} tokens as one group "
            "(whole 256-token units, at least 1024)") in out, out
    assert "packed sequences of 2048 tokens" in data.description


def test_short_records_pack_at_1024_as_before(tmp_path):
    cfg = _cfg(tmp_path, _records(tmp_path / "r.jsonl", [30, 60, 90]))
    assert recipe.prepare_data(cfg).train.seq_length == cfg.data.seq_length == 1024


def test_the_held_out_records_count_and_sequence_parallelism_divides_the_length(tmp_path):
    train = _records(tmp_path / "r.jsonl", [30, 60])
    held = _records(tmp_path / "held.jsonl", [1500])
    cfg = _cfg(tmp_path, train, f"finetune.eval={held}", "parallel.tp=3", "parallel.sequence_parallel=true")
    data = recipe.prepare_data(cfg)
    # one 768-token unit (lcm of 256 and tp=3) past the held-out record's 1500-odd tokens
    assert cfg.data.seq_length == 2304 and data.evals["held_out"].seq_length == 2304


def test_a_length_the_user_sets_is_kept(tmp_path, capsys):
    records = _records(tmp_path / "r.jsonl", [30, 1880, 50])
    cfg = _cfg(tmp_path, records, "data.seq_length=1024")
    with pytest.raises(ConfigError, match=r"1 record\(s\) do not fit data.seq_length=1024 .*raise data.seq_length to "
                                          r"\d+ \(or leave it out: 0, the longest record's length\)"):
        recipe.prepare_data(cfg)
    cfg = _cfg(tmp_path, records, "data.seq_length=1024", "finetune.on_error=skip")
    data = recipe.prepare_data(cfg)
    assert (cfg.data.seq_length, len(data.train.groups)) == (1024, 2)
    assert "from the data" not in capsys.readouterr().out


@pytest.mark.parametrize("value,ok", [("0", True), ("2", True), ("1", False), ("-5", False)])
def test_zero_or_a_real_length(tmp_path, value, ok):
    records = _records(tmp_path / "r.jsonl", [10])
    if ok:
        assert _cfg(tmp_path, records, f"data.seq_length={value}").data.seq_length == int(value)
    else:
        with pytest.raises(ConfigError, match=rf"^command line: data.seq_length={value}: must be >= 2"):
            _cfg(tmp_path, records, f"data.seq_length={value}")


def test_the_entry_script_checks_the_derived_length_against_the_layout(tmp_path, capsys):
    """Dynamic RoPE is exact only within max_position_embeddings: a length from the data is checked
    as a set one is, once known (the layout check before it saw 0)."""
    from engine.finetune import main
    from tests.polar.test_finetune_recipe import _init_step

    step = _init_step(tmp_path, max_position_embeddings=1536, rope_scaling="dynamic", rope_scaling_factor=2.0)
    records = _records(tmp_path / "r.jsonl", [30, 1880, 50])
    args = [f"checkpoint.init_from={step}", f"finetune.train={records}", "finetune.tokenizer=byte",
            "finetune.eval_fraction=0", "train.global_batch=1", f"run_dir={tmp_path / 'run'}", "--check-config"]
    assert main(args) == 2
    assert "model.max_position_embeddings=1536 positions; data.seq_length=2048 could exceed it" in \
        capsys.readouterr().err
