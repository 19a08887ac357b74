"""The embedded default's evaluation sets: `synthetic.eval_seen=false` drops the seen-policy set
and leaves the held-out set and the training data exactly as they were."""
from types import SimpleNamespace

import numpy as np
import pytest

from engine.config import ConfigError
from engine.config_load import load_config
from polar.pretrain_recipe import PretrainConfig, _check_same_tokenizer, summarize, synthetic_data

SMALL = ["synthetic.train_triplets=40", "synthetic.eval_triplets=12", "synthetic.prompts=50"]


def _tokens(packed):
    return [np.concatenate([g.prefix, *g.candidates]) for g in packed.groups]


def test_without_the_seen_set_the_rest_is_unchanged():
    both = synthetic_data(load_config(PretrainConfig, None, SMALL))
    held_only = synthetic_data(load_config(PretrainConfig, None, SMALL + ["synthetic.eval_seen=false"]))
    assert set(both.evals) == {"held_out", "seen"} and set(held_only.evals) == {"held_out"}
    for a, b in ((both.train, held_only.train), (both.evals["held_out"], held_only.evals["held_out"])):
        assert len(a.groups) == len(b.groups) > 0
        assert all(np.array_equal(x, y) for x, y in zip(_tokens(a), _tokens(b)))

    results = {"held_out": {"pair_accuracy": 0.75, "loss": 0.5, "pairs": 12}}
    summary, lines = summarize(held_only, results)
    assert summary["held_out_loss"] == 0.5 and summary["seen_loss"] is None
    assert "seen policies" not in lines[0] and "held-out pair accuracy 0.750" in lines[0]


def test_a_built_dataset_smaller_than_a_batch_is_refused_before_any_process_group(tmp_path):
    """Found at start-up, not as a ValueError on every rank once the model is built."""
    from engine.data import PackedGroups
    from polar.pretrain_recipe import check
    from tests.engine.test_indexed_dataset import SEQ, random_groups, write

    packed = PackedGroups(random_groups(4, 20), SEQ)
    write(tmp_path / "ds" / "shard", packed)
    ok = load_config(PretrainConfig, None, [f"data.path={tmp_path / 'ds'}", f"data.seq_length={SEQ}",
                                            f"train.global_batch={len(packed)}"])
    check(ok)
    big = load_config(PretrainConfig, None, [f"data.path={tmp_path / 'ds'}", f"data.seq_length={SEQ}",
                                             f"train.global_batch={len(packed) + 1}"])
    with pytest.raises(ConfigError, match=f"train.global_batch={len(packed) + 1}: data.path=.* holds only "
                                          f"{len(packed)} packed sequences"):
        check(big)


def test_a_seq_length_too_short_names_the_length_that_fits():
    """Prompts give way to the pack length first; the length the error asks for is the longest
    group's, so following the advice once is enough (it used to name the first too-long group's
    length at the old truncation, which a retry outgrew)."""
    import re

    import pytest

    from engine.config import ConfigError

    with pytest.raises(ConfigError, match=r"training data: 40 of 40 triplets; .* do not fit data.seq_length=64") as e:
        synthetic_data(load_config(PretrainConfig, None, SMALL + ["data.seq_length=64"]))
    need = int(re.search(r"at least (\d+)", str(e.value)).group(1))
    data = synthetic_data(load_config(PretrainConfig, None, SMALL + [f"data.seq_length={need}"]))
    assert max(len(g) for g in data.train.groups) <= need


def test_pretraining_from_a_checkpoint_on_data_of_another_tokenizer_is_refused(tmp_path):
    """`engine/pretrain.py checkpoint.init_from=ckpt/base` (an imported model with its BPE) trained
    on the byte-tokenized synthetic data without a word: the 260 byte ids fit its vocabulary."""
    import pytest
    import yaml

    from engine.config import ConfigError
    from polar.pretrain_recipe import check
    from tests.polar.test_tokenizer import train_bpe

    def base(name, tokenizer):
        step = tmp_path / name / "checkpoints" / "step_00000000"
        step.mkdir(parents=True)
        (step / "trainer_state.json").write_text("{}")
        (step / "metadata.json").write_text("{}")  # megatron's: without it the step is an incomplete copy
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"data": {"path": ""}}))
        if tokenizer:
            train_bpe(tmp_path / name / "checkpoints" / "tokenizer")
        return tmp_path / name

    bpe_base = base("bpe", True)
    with pytest.raises(ConfigError, match=r"checkpoint.init_from=.*bpe was trained with the tokenizer .*tokenizer, "
                                          r"but the embedded synthetic data is tokenized by the byte tokenizer"):
        check(load_config(PretrainConfig, None, [*SMALL, f"checkpoint.init_from={bpe_base}"]))
    check(load_config(PretrainConfig, None, [*SMALL, f"checkpoint.init_from={base('bytes', False)}"]))


def test_the_data_line_says_that_the_data_is_synthetic_and_notes_a_vocabulary_it_does_not_use():
    """A full-size preset with data.path left empty trained on the embedded synthetic byte data, and the
    data line never said so."""
    from polar.tokenizer import ByteTokenizer

    line = synthetic_data(load_config(PretrainConfig, None, SMALL)).description
    assert line.startswith("data: synthetic data (data.path empty): ") and "note:" not in line, line
    line = synthetic_data(load_config(PretrainConfig, None, SMALL + ["model.vocab_size=92544"])).description
    assert (f"note: model.vocab_size=92544, but the synthetic data is byte-tokenized ({ByteTokenizer.vocab_size} "
            f"ids)") in line and "data.path" in line, line


def test_a_resume_with_other_synthetic_data_settings_is_refused_naming_them(tmp_path):
    """synthetic.seed=1 or data.packing=ordered on resume were refused only as 'the data order changed
    (... packed sequence count): 209 when saved, 287 now', naming neither. The evaluation sets' settings
    leave the training data as it is: a resume may change them."""
    import json

    import pytest

    from engine import checkpoint, resume_checks
    from engine.config import ConfigError
    from polar.pretrain_recipe import check

    def cfg(*overrides):
        return load_config(PretrainConfig, None, SMALL + [f"run_dir={tmp_path}", *overrides])

    step = tmp_path / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / checkpoint.STATE_FILE).write_text(json.dumps({"step": 2, "data_settings":
                                                          resume_checks.data_settings(cfg())}))
    check(cfg("synthetic.eval_triplets=20", "synthetic.eval_seen=false", "synthetic.held_out_policies=10"))
    with pytest.raises(ConfigError) as e:
        check(cfg("synthetic.seed=1", "data.packing=ordered"))
    assert "synthetic.seed=0 when saved, 1 now" in str(e.value) and "data.packing=best_fit when saved" in str(e.value)
    check(cfg("synthetic.seed=1", "checkpoint.resume=false"))  # no resume: (another check refuses the directory)


def test_an_evaluation_set_must_have_the_training_datas_ids():
    """vocabulary size, pad and BOS ids always (a key one dataset lacks counts as differing); the tokenizer's
    digest and reward ids where both record them (shards built before the digest was recorded lack it)."""
    ids = {"vocab_size": 300, "pad_id": 1, "bos_id": 2}
    train = SimpleNamespace(meta={**ids, "tokenizer_digest": "d1", "reward_token_id": 9})
    for meta in (ids, {**ids, "tokenizer_digest": "d1"}, {**ids, "reward_sep_id": 5}):
        _check_same_tokenizer(SimpleNamespace(meta=meta), train, "data.eval_path=ev", "data.path=ds")
    for changed, said in (({"bos_id": 3}, "bos_id: 3 vs 2"), ({"bos_id": None}, "bos_id: None vs 2"),
                          ({"tokenizer_digest": "d2"}, "tokenizer_digest: d2 vs d1"),
                          ({"reward_token_id": 8}, "reward_token_id: 8 vs 9")):
        with pytest.raises(ConfigError) as e:
            _check_same_tokenizer(SimpleNamespace(meta={**ids, **changed}), train, "data.eval_path=ev", "data.path=ds")
        assert str(e.value).startswith(f"data.eval_path=ev and data.path=ds disagree on {said} (built with"), \
            str(e.value)
