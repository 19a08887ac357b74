"""A causal LM's output layer travels through `polar convert hf-to-engine` into the auxiliary LM
head (train.aux_lm_weight > 0): the engine's packed next-token loss then equals transformers'
causal-LM loss on each candidate's own sequence, with tied and untied heads and after a conversion
at TP2 (the padded vocabulary split by rows; the vocabulary-parallel loss itself is checked at TP2
by the parallel-parity tests). A checkpoint without a head loads into a model with one,
keeping the head's initialisation, and a run cannot resume into one."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="pip install transformers safetensors")

from polar.convert import hf_to_engine  # noqa: E402
from polar.convert.tokenizer_files import load as load_tokenizer  # noqa: E402
from tests.polar.convert import helpers, tiny_models as tm  # noqa: E402

RTOL = 1e-6
PER_SEQUENCE = [2, 3]


def _causal_lm(tied: bool):
    import transformers

    torch.manual_seed(1)
    # 200 rows, padded to 256: at TP2 the second rank holds real rows 128..199 (with the tokenizer's 61
    # words only, every real row would sit on the first rank)
    model = transformers.LlamaForCausalLM(tm.llama_config("llama", vocab=200, tie_word_embeddings=tied)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _convert(ref, tmp_path):
    src = tm.save(ref, tmp_path / "src")
    said = []
    dst = hf_to_engine.convert(src, tmp_path / "engine", log=said.append)
    assert any("head was kept" in s for s in said), said
    tok = load_tokenizer(dst / "tokenizer")
    groups = helpers.random_groups(5, sum(PER_SEQUENCE), 5, tm.len_vocab(), tok.reward_token_id)
    return dst, tok, groups


def _engine(dst, lm_head: bool = True):
    from engine import checkpoint, checkpoint_load
    from polar.convert.engine_io import build, read_model_config

    chunks, _ = build(read_model_config(dst / "model.yaml"), lm_head=lm_head)
    checkpoint_load.load(checkpoint.latest(str(dst)), chunks)
    return chunks


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_converted_head_gives_the_transformers_next_token_loss(tmp_path, tied):
    ref = _causal_lm(tied)
    dst, tok, groups = _convert(ref, tmp_path)
    got = helpers.engine_lm_loss(_engine(dst), helpers.pack(groups, PER_SEQUENCE, tok.pad_id))
    want = helpers.hf_lm_loss(ref, groups)
    assert want > 1.0
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)


def test_converted_head_at_tp2_under_torchrun(tmp_path):
    """Converted at --tp 2 (each rank writes its rows of the padded vocabulary) and read back here
    at TP1: a wrong row offset on the second rank changes the rows 128..199 and the loss."""
    import os
    import subprocess
    import sys

    ref = _causal_lm(False)
    src = tm.save(ref, tmp_path / "src")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "polar.convert.hf_to_engine", str(src), str(tmp_path / "engine"), "--tp", "2"]
    env = dict(os.environ, PYTHONPATH=str(helpers.ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=helpers.ROOT)
    assert proc.returncode == 0 and "head was kept" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-5000:]
    dst = tmp_path / "engine"
    tok = load_tokenizer(dst / "tokenizer")
    groups = helpers.random_groups(5, sum(PER_SEQUENCE), 5, tm.len_vocab(), tok.reward_token_id)
    got = helpers.engine_lm_loss(_engine(dst), helpers.pack(groups, PER_SEQUENCE, tok.pad_id))
    torch.testing.assert_close(got, helpers.hf_lm_loss(ref, groups), rtol=RTOL, atol=0)


def test_a_checkpoint_without_a_head_loads_into_a_model_with_one(tmp_path):
    """A sequence classifier has no LM head: the weights it has load (the rewards are the
    transformers ones) and the head keeps its random initialisation."""
    from engine import checkpoint, checkpoint_load
    from polar.convert.engine_io import build, read_model_config

    ref = tm.random_seq_cls(tm.llama_config("llama"))
    dst = hf_to_engine.convert(tm.save(ref, tmp_path / "src"), tmp_path / "engine", log=lambda *a: None)
    step = checkpoint.latest(str(dst))
    assert not checkpoint_load.has_lm_head(step)

    chunks, rt = build(read_model_config(dst / "model.yaml"), lm_head=True)
    head = chunks[0].module if hasattr(chunks[0], "module") else chunks[0]
    torch.nn.init.normal_(head.lm_head.weight, std=0.02)
    before = head.lm_head.weight.detach().clone()
    checkpoint_load.load(step, chunks)
    assert torch.equal(head.lm_head.weight, before)

    from engine.scoring import score

    tok = load_tokenizer(dst / "tokenizer")
    groups = helpers.random_groups(2, 3, 5, tm.len_vocab(), tok.reward_token_id)
    got = score(chunks, helpers.pack(groups, [1, 2], tok.pad_id), rt)
    want = helpers.hf_scores(ref, helpers.unpacked_inputs(groups))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())


def test_a_run_cannot_resume_into_a_head_its_checkpoint_lacks(tmp_path):
    from engine.config import ConfigError
    from engine.config_load import load_config
    from engine.start_checks import check_checkpoints
    from polar.pretrain_recipe import PretrainConfig

    ref = tm.random_seq_cls(tm.llama_config("llama"))
    dst = hf_to_engine.convert(tm.save(ref, tmp_path / "src"), tmp_path / "engine", log=lambda *a: None)
    cfg = load_config(PretrainConfig, str(dst / "model.yaml"), [f"run_dir={tmp_path / 'run'}", f"checkpoint.dir={dst}",
                                                                "train.aux_lm_weight=0.5"])
    with pytest.raises(ConfigError, match="train.aux_lm_weight=0.5: the run resumes from .* without an LM head"):
        check_checkpoints(cfg)
    cfg.train.aux_lm_weight = 0.0
    check_checkpoints(cfg)
