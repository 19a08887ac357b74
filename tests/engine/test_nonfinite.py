"""A step whose loss is not finite is skipped (no update) and reported; too many in a row stop the run
with where they happened. The non-finite loss is injected into the real training step."""
from __future__ import annotations

import math

import pytest
import torch

from engine.config import EngineConfig
from engine.config_load import load_config
from tests.engine.dist_worker import random_groups

SMALL = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=1",
         "model.ffn_hidden_size=64", "model.vocab_size=64", "train.global_batch=4", "train.micro_batch=2",
         "train.lr=1e-2", "train.warmup_steps=0", "data.seq_length=64", "log.interval=1", "log.tensorboard=false",
         "checkpoint.resume=false"]


def make_trainer(runtime, tmp_path, *overrides):
    from engine.data import PackedGroups
    from engine.trainer import Trainer

    cfg = load_config(EngineConfig, None, SMALL + [f"run_dir={tmp_path}", *overrides])
    data = PackedGroups(random_groups(3, 40, 64, 64), 64)
    return Trainer(cfg, runtime, data, str(tmp_path), pad_id=0, log=lambda *a, **k: None)


@pytest.fixture
def inject(monkeypatch):
    """inject(trainer, steps, micro_batch): the loss of that micro-batch becomes NaN at those steps."""
    import engine.trainer as trainer_module

    real = trainer_module.contrastive_loss
    state = {}

    def poisoned(kind, rewards, batch, backend="torch"):
        loss_sum, count, stats = real(kind, rewards, batch, backend)
        t = state["trainer"]
        state["calls"] = state.get("calls", 0) + 1
        if t.step + 1 in state["steps"] and (state["calls"] - 1) % state["per_step"] == state["micro_batch"]:
            loss_sum = loss_sum * float("nan")
            stats = stats * float("nan")
        return loss_sum, count, stats

    def arm(trainer, steps, micro_batch=1):
        state.update(trainer=trainer, steps=set(steps), micro_batch=micro_batch,
                     per_step=trainer.loader.global_batch // trainer.loader.micro_batch // trainer.rt.dp)
        monkeypatch.setattr(trainer_module, "contrastive_loss", poisoned)

    return arm


def params(trainer):
    return [p.detach().clone() for c in trainer.model for p in c.parameters()]


def test_one_nonfinite_step_is_skipped_and_training_goes_on(runtime, tmp_path, inject):
    trainer = make_trainer(runtime, tmp_path, "train.steps=4")
    inject(trainer, steps={2}, micro_batch=1)
    before = {}

    def snapshot_at_step_1(orig=trainer.train_step):
        def step():
            if trainer.step == 1:
                before["p"] = params(trainer)
            out = orig()
            if trainer.step == 1:  # train_step ran for step 2 (step counter is bumped by fit)
                before["after"] = params(trainer)
            return out
        return step

    trainer.train_step = snapshot_at_step_1()
    history = trainer.fit()
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert history[1].get("skipped_steps") == 1 and "skipped_steps" not in history[2]
    # the skipped step's NaNs stay out of the log; its window counted nothing, so shows no loss at all
    assert "loss" not in history[1] and all(math.isfinite(r["loss"]) for r in history if r is not history[1])
    # the skipped step changed no weight; the others did
    assert all(torch.equal(a, b) for a, b in zip(before["p"], before["after"]))
    assert len(trainer.skipped_steps) == 1
    entry = trainer.skipped_steps[0]
    assert entry["step"] == 2 and not math.isfinite(entry["grad_norm"])
    assert entry["micro_batches"] == [{"dp_rank": 0, "micro_batch": 1}]
    # the packed sequences of micro-batch 1 of global batch 1 are named
    idx = trainer.loader.global_batch_indices(1)
    assert entry["global_batch"] == 1 and entry["sequences"] == sorted(int(i) for i in idx[2:4])
    assert trainer.step == 4


def test_nonfinite_at_every_step_stops_the_run_with_where(runtime, tmp_path, inject):
    from engine.nonfinite_steps import NonFiniteError

    trainer = make_trainer(runtime, tmp_path, "train.steps=10", "train.max_nonfinite_steps=3")
    inject(trainer, steps=set(range(1, 11)), micro_batch=0)
    start = params(trainer)
    with pytest.raises(NonFiniteError) as err:
        trainer.fit()
    msg = str(err.value)
    assert "3 optimizer steps in a row" in msg and "train.max_nonfinite_steps=3" in msg
    assert "step 3" in msg and "global batch 2" in msg and "'micro_batch': 0" in msg
    # a lower lr is a new run: a resume keeps the optimizer settings it was saved with
    assert "the optimizer and schedule settings may not" in msg and "start again with a lower train.lr" in msg
    assert trainer.step == 3
    assert all(torch.equal(a, b) for a, b in zip(start, params(trainer)))  # nothing was applied
    assert trainer.loader._reader is None and not trainer.loader._ahead  # the read ahead stopped with it
