"""Host syncs per training step, counted (tests/engine/sync_count.py): a regression guard. On a GPU
every device-to-host read stalls the host until the device has caught up, so the step makes one,
the global gradient norm (the skip decision and the clipping need it on the host), plus the stop
check's one scalar (engine.stop_agreement.StopAgreement.at_step) when train.time_limit_s or
train.stop_file is set, and in every step of a run over several ranks inside fit, stop setting or
not (the all-reduce that tells every rank of a SIGTERM any rank received); a single process with no
stop setting reads its own SIGTERM flag without a sync. The steps here run in one process outside
fit: one sync, two with a stop setting. A new sync anywhere in the step (data, model, loss,
optimizer) or in fit's logging fails here with its call site."""
from __future__ import annotations

import collections

import pytest

from tests.engine.sync_count import count_syncs
from tests.engine.test_trainer import make_trainer

GRAD_NORM = "megatron/core/optimizer/clip_grads.py"  # total_norm.item(): the step's one sync


def step_syncs(trainer) -> list[tuple[str, str]]:
    trainer.train_step()  # first step: lazy initialisation (optimizer state, caches)
    with count_syncs() as events:
        trainer.train_step()
    return events


def show(events) -> str:
    return "\n".join(f"{n} x {kind} at {site}" for (kind, site), n in collections.Counter(events).items())


@pytest.mark.parametrize("overrides", [
    [],
    ["train.loss=infonce", "train.aux_lm_weight=0.5"],
    ["train.attention_backend=torch", "train.micro_batch=1"],
], ids=["pairwise", "infonce+lm", "dense-attention"])
def test_a_training_step_makes_one_host_sync_the_gradient_norm(runtime, tmp_path, overrides):
    """Before: two; megatron's l2-norm fallback (no Transformer Engine, no Apex) read every
    per-tensor norm to the host (a sync per gradient tensor on a GPU) and the total once more."""
    events = step_syncs(make_trainer(runtime, tmp_path, "checkpoint.resume=false", *overrides))
    assert len(events) == 1 and events[0][1].startswith(GRAD_NORM), show(events)


@pytest.mark.parametrize("setting", ["train.time_limit_s=1e6", "train.stop_file={tmp}/STOP"],
                         ids=["time_limit", "stop_file"])
def test_a_stop_check_adds_one_scalar_read_before_the_optimizer_update(runtime, tmp_path, monkeypatch, setting):
    """train.time_limit_s and train.stop_file cost one scalar per step (all-reduced over several
    ranks; both together: still one), read right after the gradient norm's sync while nothing is
    queued on the device: not after the update, which it would wait for."""
    trainer = make_trainer(runtime, tmp_path, "checkpoint.resume=false", setting.format(tmp=tmp_path))
    trainer.stops.begin()  # as inside fit
    order = []
    real_check = trainer.stops.at_step
    monkeypatch.setattr(trainer.stops, "at_step", lambda step: order.append("stop check") or real_check(step))
    for opt in trainer.optimizer.chained_optimizers:
        real = opt.step_with_ready_grads
        monkeypatch.setattr(opt, "step_with_ready_grads", lambda real=real: order.append("update") or real())
    events = step_syncs(trainer)
    assert len(events) == 2 and events[0][1].startswith(GRAD_NORM), show(events)
    assert events[1][0] == "aten._local_scalar_dense", show(events)
    assert events[1][1].startswith("engine/stop_agreement.py"), show(events)
    assert order[-2:] == ["stop check", "update"] and trainer.stop_request == ""


def test_fit_reads_the_log_window_once_per_log_step_and_nothing_more_per_step(runtime, tmp_path):
    """The loop around the steps (counters, FLOPs, the progress line, TensorBoard, the LM loss): six
    steps logged every third add one read each log step (the window's sums, engine/trainer.py), none
    at the others, and fit's closing SIGTERM check one; nothing from engine/progress.py, which gets
    host numbers only."""
    trainer = make_trainer(runtime, tmp_path, "checkpoint.resume=false", "checkpoint.save_at_end=false",
                           "train.steps=6", "log.interval=3", "log.tensorboard=true", "train.aux_lm_weight=0.5")
    with count_syncs() as events:
        trainer.fit()
    norms = [e for e in events if e[1].startswith(GRAD_NORM)]
    rest = collections.Counter((kind, site.split(":")[0]) for kind, site in events if not site.startswith(GRAD_NORM))
    assert len(norms) == 6, show(events)
    assert rest == {("Tensor.tolist", "engine/trainer.py"): 2,
                    ("aten._local_scalar_dense", "engine/stop_agreement.py"): 1}, show(events)


def test_the_blocks_attention_reads_each_micro_batch_layout_once(runtime, tmp_path):
    """The `blocks` backend (the CPU path) cuts packs into groups on the host: one read of the layout
    per micro-batch, shared by every layer; none for packs short enough for the dense path."""
    from engine.data import PackedGroups
    from engine.model import shared_prefix_attention as spa
    from tests.engine.dist_worker import random_groups

    trainer = make_trainer(runtime, tmp_path, "checkpoint.resume=false", "data.seq_length=512",
                           "model.max_position_embeddings=512")
    trainer.loader.source = PackedGroups(random_groups(3, 200, 64, 512), 512)
    assert trainer.loader.source.seq_length >= spa.DENSE_BELOW
    events = step_syncs(trainer)
    layout_reads = [e for e in events if "shared_prefix_attention.py" in e[1]]
    micro_batches = trainer.cfg.train.global_batch // trainer.cfg.train.micro_batch
    assert [k for k, _ in layout_reads] == ["Tensor.cpu"] * micro_batches, show(events)
    assert len(events) == micro_batches + 1, show(events)


def test_the_counter_sees_a_sync_planted_in_the_loss(runtime, tmp_path, monkeypatch):
    """The guard itself: a `.item()` or a boolean mask in the per-micro-batch loss is counted (once
    per micro-batch), forward and backward alike."""
    import engine.trainer as trainer_module

    real = trainer_module.contrastive_loss

    def with_syncs(kind, rewards, batch, kernels):
        float(rewards.sum())  # a stray host read
        rewards = rewards[rewards == rewards]  # a boolean mask: its shape comes from values
        return real(kind, rewards, batch, kernels)

    trainer = make_trainer(runtime, tmp_path, "checkpoint.resume=false")
    monkeypatch.setattr(trainer_module, "contrastive_loss", with_syncs)
    kinds = collections.Counter(kind for kind, _ in step_syncs(trainer))
    micro_batches = trainer.cfg.train.global_batch // trainer.cfg.train.micro_batch
    assert kinds["aten._local_scalar_dense"] == micro_batches + 1  # + the gradient norm
    assert kinds["aten.index[bool mask]"] == micro_batches  # the forward
    assert kinds["aten.index_put[bool mask]"] == micro_batches  # its backward


def test_the_device_gradient_norm_is_megatrons_fallback_bit_for_bit(runtime):
    """engine.optim._device_l2_norm replaces megatron's local l2-norm fallback (no TE, no Apex):
    the same per-tensor norms and the same norm of them, without their trip to the host."""
    import torch
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    from engine.optim import _device_l2_norm, use_device_grad_norm

    use_device_grad_norm()  # what build_optimizer does (this test may run before any optimizer is built)
    assert clip_grads.l2_norm_impl in (_device_l2_norm, getattr(clip_grads, "multi_tensor_l2norm", None),
                                       getattr(getattr(clip_grads, "amp_C", None), "multi_tensor_l2norm", None))
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 3, 40):
            grads = [(torch.randn(int(torch.randint(1, 3000, (1,), generator=g)), generator=g)
                      * 10 ** float(torch.randn(1, generator=g) * 3)).to(dtype) for _ in range(n)]
            with count_syncs() as events:
                ours, _ = _device_l2_norm(2048 * 32, torch.zeros(1, dtype=torch.int), [grads], False)
            theirs, _ = local_multi_tensor_l2_norm(2048 * 32, None, [grads], False)
            assert events == []
            assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape == (1,)
            assert torch.equal(ours, theirs), (dtype, n, ours, theirs)
