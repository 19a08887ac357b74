"""The training loop: megatron's pipeline schedules drive forward/backward, megatron DDP and the
(distributed) optimizer step, and the contrastive loss is normalised over the global batch.

Read top to bottom: build (model, optimizer, loader) -> resume -> for each step: micro-batches ->
forward_backward -> optimizer step -> log / checkpoint. Nothing leaves the device except at log
steps (the grad norm megatron computes for clipping is the one exception).
"""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from engine import checkpoint
from engine.data import GlobalBatchLoader, PackedGroups
from engine.loss import contrastive_loss
from engine.packing import next_token_mask
from engine.parallelize import build_model, count_parameters, resolve_dtype
from engine.optim import build_optimizer
from engine.progress import Progress, flops_per_token, peak_tflops
from engine.runtime import Runtime

STATS = 6  # loss_sum, correct_pairs, loss_count, pairs, lm_loss_sum, lm_targets


def _forward_step(loss_kind: str, kernels: str, lm_scale: float, data_iterator, model):
    """`lm_scale` = aux weight x (global contrastive count / global next-token targets): megatron
    divides the summed loss by the global contrastive count, which turns the LM term into
    weight x (mean next-token loss over the global batch), exactly."""
    batch = next(data_iterator)
    output = model(batch.tokens, batch.layout, batch.reward_index)

    def loss_func(output):
        n = batch.reward_index.numel()
        loss_sum, count, stats = contrastive_loss(loss_kind, output[:n], batch, kernels)
        if output.numel() > n:
            lm_sum = output[n]
            loss_sum = loss_sum + lm_scale * lm_sum
            lm_stats = torch.stack([lm_sum.detach(), next_token_mask(batch.layout).sum().to(stats.dtype)])
        else:
            lm_stats = torch.zeros(2, dtype=stats.dtype, device=stats.device)
        return loss_sum, count.to(torch.int), {"stats": torch.cat([stats, lm_stats])}

    return output, loss_func


class Trainer:
    def __init__(self, cfg, rt: Runtime, train_data: PackedGroups, run_dir: str, pad_id: int, log=print):
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads

        self.cfg = cfg
        self.rt = rt
        self.log = log if rt.is_main else (lambda *a, **k: None)
        self.run_dir = Path(run_dir)
        self.ckpt_dir = cfg.checkpoint.dir or str(self.run_dir / "checkpoints")
        self.dtype = resolve_dtype(cfg.train, rt)
        self.model, self.mcfg = build_model(cfg.model, cfg.parallel, cfg.train, rt)
        self.optimizer, self.scheduler = build_optimizer(cfg.train, cfg.parallel, self.model, self.dtype)
        self.mcfg.finalize_model_grads_func = finalize_model_grads
        no_sync = [m.no_sync for m in self.model]
        self.mcfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.pad_id = pad_id
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.loader = GlobalBatchLoader(
            train_data, cfg.train.global_batch, cfg.train.micro_batch, self.dp_rank, rt.dp,
            seed=cfg.train.seed, pad_id=pad_id,
        )
        self.step = 0
        self.last_saved_step = -1
        self.history: list[dict] = []
        self.is_last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        n_local = count_parameters(self.model)
        total = torch.tensor([n_local], dtype=torch.float64, device=rt.device)  # NCCL needs device tensors
        dist.all_reduce(total)  # every TP/PP shard counted once per DP replica
        self.num_parameters = int(total.item() / rt.dp)
        self._resume()

    # ---- checkpoints -------------------------------------------------------------------------
    def _resume(self) -> None:
        ck = self.cfg.checkpoint
        path = checkpoint.latest(self.ckpt_dir) if ck.resume else None
        if path:
            state = checkpoint.load(path, self.model, self.optimizer)
            self.step = int(state["step"])
            self.loader.load_state_dict(state["loader"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.history = state.get("history", [])
            self.last_saved_step = self.step
            self.log(f"resumed from {path} at step {self.step}")
        elif ck.init_from:
            checkpoint.load(ck.init_from, self.model, None)
            self.log(f"initialised weights from {ck.init_from}")

    def save(self) -> str:
        state = {
            "step": self.step,
            "loader": self.loader.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "layout": {"tp": self.rt.tp, "pp": self.rt.pp, "dp": self.rt.dp, "vpp": self.rt.vpp},
        }
        path = checkpoint.save(self.ckpt_dir, self.step, self.model, self.optimizer, state, self.cfg.checkpoint.keep)
        self.last_saved_step = self.step
        self.log(f"saved checkpoint {path}")
        return path

    # ---- one optimizer step ------------------------------------------------------------------
    def _run_schedule(self, microbatches, forward_only: bool, micro_batch: int | None = None, lm_scale: float = 0.0):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        device_batches = [mb.to(self.rt.device) for mb in microbatches]
        iters = [iter(device_batches) for _ in self.model]
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, self.cfg.train.loss, self.cfg.train.kernels, lm_scale),
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.model,
            num_microbatches=len(device_batches),
            seq_length=self.loader.source.seq_length,
            micro_batch_size=micro_batch or self.cfg.train.micro_batch,
            forward_only=forward_only,
        )

    def _sum_stats(self, outputs) -> torch.Tensor:
        if self.is_last_stage and outputs:
            return torch.stack([o["stats"] for o in outputs]).sum(0)
        return torch.zeros(STATS, device=self.rt.device)

    def train_step(self):
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        microbatches = self.loader.next_microbatches()
        g = self.loader.last_global
        count = g["pairs"] if self.cfg.train.loss == "pairwise" else g["positives"]
        lm_scale = self.cfg.train.aux_lm_weight * count / max(g["lm_targets"], 1)
        outputs = self._run_schedule(microbatches, forward_only=False, lm_scale=lm_scale)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return self._sum_stats(outputs), (grad_norm if grad_norm is not None else float("nan"))

    def _reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel replicas, then over the pipeline (only the last stage is non-zero)."""
        from megatron.core import parallel_state

        dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(stats, group=parallel_state.get_pipeline_model_parallel_group())
        return stats

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        tc, lc = self.cfg.train, self.cfg.log
        m = self.cfg.model
        avg_keys = self.loader.source.seq_length / 4  # rough: prefix + own-candidate keys per query
        progress = Progress(
            tc.steps, self.step, self.rt.is_main,
            str(self.run_dir / "tensorboard") if lc.tensorboard else None,
            flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                            m.num_query_groups, avg_keys),
            peak_tflops(self.rt.device), self.rt.world_size,
        )
        self.log(
            f"training {self.num_parameters:,} parameters | layout tp={self.rt.tp} pp={self.rt.pp} "
            f"dp={self.rt.dp} vpp={self.rt.vpp} | {tc.steps} steps of {tc.global_batch} packed sequences "
            f"x {self.loader.source.seq_length} tokens | packing efficiency "
            f"{self.loader.source.packing_efficiency:.1%} | {self.dtype} on {self.rt.device.type}"
        )
        window = torch.zeros(STATS, device=self.rt.device)
        tokens = real_tokens = groups = 0
        grad_norm = float("nan")
        start = time.time()
        stop = False
        while self.step < tc.steps and not stop:
            stats, grad_norm = self.train_step()
            self.step += 1
            window += stats
            real_tokens += self.loader.last_global["tokens"]
            groups += self.loader.last_global["groups"]
            tokens += tc.global_batch * self.loader.source.seq_length
            if self.step % lc.interval == 0 or self.step == tc.steps:
                s = self._reduce(window).tolist()
                row = progress.log(
                    self.step, s[0] / max(s[2], 1), s[1] / max(s[3], 1), self.optimizer.param_groups[0]["lr"],
                    grad_norm, tokens, real_tokens, groups,
                    lm_loss=s[4] / s[5] if s[5] > 0 else None,
                )
                self.history.append(row)
                window.zero_()
                tokens = real_tokens = groups = 0
                if tc.time_limit_s > 0:
                    flag = torch.tensor([float(time.time() - start > tc.time_limit_s)], device=self.rt.device)
                    dist.broadcast(flag, src=0)
                    stop = bool(flag.item())
                    if stop:
                        self.log(f"train.time_limit_s={tc.time_limit_s} reached at step {self.step}")
            if self.cfg.checkpoint.save_interval and self.step % self.cfg.checkpoint.save_interval == 0:
                self.save()
            if tc.exit_at_step and self.step == tc.exit_at_step and self.step < tc.steps:
                self.log(f"train.exit_at_step={tc.exit_at_step} reached")
                stop = True
        progress.close()
        if self.last_saved_step != self.step:
            self.save()  # the end of training, or an early stop, always leaves a resumable checkpoint
        return self.history

    # ---- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: PackedGroups) -> dict:
        """Pairwise accuracy and loss over every group of `data` (forward only, all DP ranks share)."""
        from engine.packing import collate

        mb = 1  # pipeline stages exchange fixed-shape activations: one sequence per micro-batch
        for chunk in self.model:
            chunk.eval()
        mine = list(range(self.dp_rank, len(data), self.rt.dp))
        batches = [collate(data.sequences(mine[i:i + mb]), data.seq_length, self.pad_id) for i in range(0, len(mine), mb)]
        stats = torch.zeros(STATS, device=self.rt.device)
        if batches:
            stats += self._sum_stats(self._run_schedule(batches, forward_only=True, micro_batch=mb))
        for chunk in self.model:
            chunk.train()
        s = self._reduce(stats).tolist()
        out = {"loss": s[0] / max(s[2], 1), "pair_accuracy": s[1] / max(s[3], 1), "pairs": int(s[3])}
        if s[5] > 0:
            out["lm_loss"] = s[4] / s[5]
        return out
