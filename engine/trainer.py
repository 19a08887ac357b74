"""The training loop: megatron's pipeline schedules drive forward/backward, megatron DDP and the
(distributed) optimizer step, and the contrastive loss is normalised over the global batch.

Read top to bottom: build (model, optimizer, loader) -> resume -> for each step: micro-batches ->
forward_backward -> optimizer step (skipped when the loss or gradients are not finite) -> log /
evaluate / checkpoint. Nothing leaves the device except at log steps and the one scalar the step
decision needs (the global gradient norm, computed once and used for clipping too).
"""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine import (checkpoint, checkpoint_async, checkpoint_load, metrics_file, nonfinite_steps, profiling,
                    resume_checks)
from engine.config import ConfigError
from engine.data import GlobalBatchLoader, PackedGroups
from engine.evaluation import STATS, EvaluationStopped, evaluate
from engine.loss import contrastive_loss
from engine.model.fp8_linear import weight_cache
from engine.optim import build_optimizer, step_with_norm
from engine.packing import next_token_mask
from engine.parallelize import build_model, count_parameters, resolve_attention_backend, resolve_dtype
from engine.progress import (Progress, attention_flops_per_pair, dense_flops_per_token, peak_tflops,
                             spec_sheet_tflops)
from engine.runtime import Runtime
from engine.stop_agreement import StopAgreement
from engine.stop_signal import EXIT_SIGTERM, StoppedBySignal


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
    def __init__(self, cfg, rt: Runtime, train_data: PackedGroups, run_dir: str, pad_id: int, log=print,
                 evals: dict | None = None, held_file: str = "", final_evaluation: bool = False):
        """`final_evaluation`: the caller evaluates after fit (engine/pretrain.py) and hands the results to
        log_final, which writes them where fit's figures went: fit leaves the progress logs open for it
        (it closes them itself where a SIGTERM or an error stops it)."""
        from megatron.core.distributed import finalize_model_grads

        profiling.check_start_up(cfg.train, rt.world_size, rt.is_cuda)
        self.cfg = cfg
        self.rt = rt
        self.log = log if rt.is_main else (lambda *a, **k: None)
        self.run_dir = Path(run_dir)
        self.ckpt_dir = cfg.checkpoint.dir or str(self.run_dir / "checkpoints")
        self.dtype = resolve_dtype(cfg.train, rt)
        self.model, self.mcfg = build_model(cfg.model, cfg.parallel, cfg.train, rt)
        self.optimizer, self.scheduler = build_optimizer(cfg.train, cfg.parallel, self.model, self.dtype)
        # the non-distributed optimizers' state is per parameter whatever the setting (reshardable)
        self.optimizer_format = (cfg.checkpoint.optimizer_format if cfg.parallel.distributed_optimizer
                                 else "fully_reshardable")
        self.mcfg.finalize_model_grads_func = finalize_model_grads
        no_sync = [m.no_sync for m in self.model]
        self.mcfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.pad_id = pad_id
        self.evals = evals or {}
        self.held_file = held_file  # the setting giving the held-out file, named by a resume's notes
        self.loader = GlobalBatchLoader(
            train_data, cfg.train.global_batch, cfg.train.micro_batch, rt.dp_rank, rt.dp,
            seed=cfg.train.seed, pad_id=pad_id, pin_memory=rt.device if rt.is_cuda else None,
        )
        self.step = 0
        # time limit, stop file, SIGTERM: agreed over the ranks; its lines go to the trainer's log as it is then
        self.stops = StopAgreement(rt, cfg.train, lambda *a, **k: self.log(*a, **k))
        # why the last train_step asked the run to stop early: "" (it did not), "time_limit"
        # (train.time_limit_s reached), "stop_file" (train.stop_file found) or "SIGTERM" (a rank
        # received it); see StopAgreement.at_step
        self.stop_request = ""
        self.stopped_by = ""  # the reason the last fit stopped before train.steps ("" if it did not)
        self.last_saved_step = -1
        # checkpoint.async_save: the save being written in the background (at most one)
        self.saves = checkpoint_async.BackgroundSaves() if cfg.checkpoint.async_save else None
        self.history: list[dict] = []
        self.final_evaluation = final_evaluation
        self._progress: Progress | None = None  # fit's logs while open: kept for log_final where final_evaluation
        self.skipped_steps: list[dict] = []
        self.is_last_stage = rt.is_last_stage()
        n_local = count_parameters(self.model, rt.tp_rank)  # the model's count at any layout, summed
        total = torch.tensor([n_local], dtype=torch.float64, device=rt.device)  # NCCL needs device tensors
        dist.all_reduce(total)  # every TP/PP shard counted once per DP replica
        self.num_parameters = int(total.item() / rt.dp)
        self.eval_sets = resume_checks.eval_sets(self.evals, 0, {})  # what each step records of them
        self._profiled = None  # fit's profiling window (engine.profiling.Window), closed by an error too
        self._resume()

    # ---- checkpoints -------------------------------------------------------------------------
    def _resume(self) -> None:
        ck = self.cfg.checkpoint
        # a checkpoint directory that cannot be written is found now, not at the first save
        checkpoint.check_writable(self.ckpt_dir)
        path = checkpoint.latest_agreed(self.ckpt_dir) if ck.resume else None
        if path:
            # before the load: megatron would ignore changed settings, or fail deep inside it. Read by
            # rank 0, told to the others (checkpoint_load.rank0_answer): its history grows with the run
            saved = checkpoint_load.rank0_answer(lambda: checkpoint.read_state(path))
            resume_checks.check_resume_settings(path, self.cfg.train, state=saved)
            # what the run takes otherwise than the step was saved with, said once it has resumed
            notes = resume_checks.check_resume_layout(path, self.rt.tp, self.rt.pp, self.rt.vpp, state=saved,
                                                      distributed_optimizer=self.cfg.parallel.distributed_optimizer,
                                                      dp=self.rt.dp)
            # before the buckets' check: the cause, not a symptom
            checkpoint_load.rank0_answer(lambda: resume_checks.check_resume_norm_dtypes(path))
            resume_checks.check_resume_buckets(path, self.optimizer, saved)
            if "loader" not in saved or "scheduler" not in saved:
                raise ConfigError(
                    f"checkpoint.resume: {path} holds weights only (no optimizer, schedule or data position: a "
                    f"converted model or initial weights), so there is nothing to resume; start from it with "
                    f"checkpoint.init_from={path} and a checkpoint directory of its own (a new run_dir or "
                    f"checkpoint.dir)")
            notes += resume_checks.check_resume_data_settings(path, resume_checks.data_settings(self.cfg),
                                                              state=saved, sequences=len(self.loader.source))
            try:
                self.loader.load_state_dict(saved["loader"])
            except ConfigError as e:
                raise ConfigError(f"resuming from {path}: {e}") from None
            state = checkpoint_load.load(path, self.model, self.optimizer, state=saved)
            self.step = int(state["step"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.history = state.get("history", [])
            self.eval_sets = resume_checks.eval_sets(self.evals, self.step, saved.get("eval_sets"))
            self.skipped_steps = state.get("skipped_steps", [])
            self.last_saved_step = self.step
            cut = checkpoint.partial_saves(self.ckpt_dir, after=self.step) if self.rt.is_main else []  # logged by rank 0
            self.log(f"resumed from {path} at step {self.step}"
                     + (f" (the newest complete checkpoint; ignored the save(s) that did not finish: "
                        f"{', '.join(p.name for p in cut)})" if cut else ""))
            for note in notes + resume_checks.eval_set_notes(path, saved, self.evals, self.held_file):
                self.log(note)
            if ck.init_from:
                # a requeued job names it again (it is no change); another base model meant for a new
                # run would otherwise be dropped without a word
                self.log(f"checkpoint.init_from={ck.init_from} is not loaded: the run resumes from its own "
                         f"checkpoint in {self.ckpt_dir} (a new run from those weights needs a new run_dir or "
                         f"checkpoint.dir)")
        elif ck.init_from:
            step_dir = checkpoint.resolve(ck.init_from)
            checkpoint_load.load(step_dir, self.model, None)
            self.log(f"initialised weights from {step_dir}")
            if self.cfg.train.aux_lm_weight > 0 and not checkpoint_load.has_lm_head(step_dir):
                self.log(f"{step_dir} has no LM head: the auxiliary next-token loss (train.aux_lm_weight="
                         f"{self.cfg.train.aux_lm_weight}) starts from a randomly initialised one")

    def _finish_param_sync(self) -> None:
        """With parallel.overlap_param_gather the updated parameter shards are all-gathered by
        forward pre-hooks of the next forward; a checkpoint or an evaluation needs them now
        (megatron's own loop does the same: hooks off with a synchronous gather, hooks on)."""
        for chunk in self.model:
            if chunk.ddp_config.overlap_param_gather:
                chunk.disable_forward_pre_hook(param_sync=True)
                chunk.enable_forward_pre_hook()

    def save(self) -> str:
        self._finish_param_sync()
        state = {
            "step": self.step,
            "settings": resume_checks.optimizer_settings(self.cfg.train),
            "data_settings": resume_checks.data_settings(self.cfg),
            "loader": self.loader.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "eval_sets": self.eval_sets,
            "skipped_steps": self.skipped_steps,
            "layout": {"tp": self.rt.tp, "pp": self.rt.pp, "dp": self.rt.dp, "vpp": self.rt.vpp},
            "distributed_optimizer": self.cfg.parallel.distributed_optimizer,  # its state's form (resume_checks)
            "job": checkpoint.job_identity(),  # a restart of this job resumes under checkpoint.resume=false
        }
        if self.optimizer_format == "dp_reshardable":  # the state lies in these buckets
            state["optimizer_buckets"] = resume_checks.optimizer_buckets(self.optimizer)
        self.finish_saves()  # the one pending (and its log line) before this one
        path = checkpoint.save(self.ckpt_dir, self.step, self.model, self.optimizer, state, self.cfg.checkpoint.keep,
                               model_settings=dataclasses.asdict(self.cfg.model), dp_group=self.rt.groups.dp,
                               optimizer_format=self.optimizer_format, background=self.saves)
        self.last_saved_step = self.step
        self.log(f"writing checkpoint {path} in the background" if self.saves else f"saved checkpoint {path}")
        return path

    def poll_saves(self) -> None:
        """Finalizes a background save whose writes have all finished (every rank calls it at the
        same step: at log steps, which synchronise anyway). Nothing pending: nothing is done."""
        if self.saves is not None and (path := self.saves.poll()):
            self.log(f"saved checkpoint {path}")

    def finish_saves(self) -> None:
        """Waits for the background save and finalizes it: before the run ends or reports its
        checkpoints (a failed write raises CheckpointWriteError here at the latest)."""
        if self.saves is not None and (path := self.saves.finish()):
            self.log(f"saved checkpoint {path}")

    # ---- one optimizer step ------------------------------------------------------------------
    def _run_schedule(self, microbatches, forward_only: bool, micro_batch=None, lm_scale=0.0, seq_length=None):
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        device_batches = [mb.to(self.rt.device) for mb in microbatches]
        iters = [iter(device_batches) for _ in self.model]
        return get_forward_backward_func(self.rt.pp, self.rt.vpp)(
            forward_step_func=partial(_forward_step, self.cfg.train.loss, self.cfg.train.kernels, lm_scale),
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.model,
            num_microbatches=len(device_batches),
            seq_length=seq_length or self.loader.source.seq_length,  # an eval set's own: PP sizes its sends by it
            micro_batch_size=micro_batch or self.cfg.train.micro_batch,
            forward_only=forward_only,
            p2p_communicator=P2PCommunicator(self.rt.groups.pp, self.mcfg),
            pg_collection=self.rt.groups,
        )

    def _sum_stats(self, outputs) -> torch.Tensor:
        if self.is_last_stage and outputs:
            return torch.stack([o["stats"] for o in outputs]).sum(0)
        return torch.zeros(STATS, device=self.rt.device)

    def _optimizer_step(self) -> tuple[bool, float]:
        """(updated, grad norm). The norm is global (model-parallel and DP reduced), so every rank
        takes the same decision; a non-finite loss makes the gradients non-finite too. megatron's
        own step() would clip with a NaN norm (a NaN clip factor is never < 1) and apply the NaNs,
        and would compute the norm a second time."""
        opt = self.optimizer
        found_inf = opt.prepare_grads()
        grad_norm = opt.get_grad_norm()
        self.stop_request = self.stops.at_step(self.step)
        if found_inf or not math.isfinite(grad_norm):
            return False, grad_norm
        return step_with_norm(opt, grad_norm), grad_norm

    def train_step(self):
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.scheduler.step(increment=1)  # this step's lr (engine.optim)
        # the next step's batch is read while this one runs, unless this is the run's last
        microbatches = self.loader.next_microbatches(prefetch=self.step + 1 < self.cfg.train.steps)
        g = self.loader.last_global
        count = g["pairs"] if self.cfg.train.loss == "pairwise" else g["positives"]
        lm_scale = self.cfg.train.aux_lm_weight * count / max(g["lm_targets"], 1)
        # local FP8 linears quantize each weight once per step, not once per micro-batch; the optimizer
        # step, which changes the weights without bumping their version counters, runs after the scope
        with weight_cache():
            outputs = self._run_schedule(microbatches, forward_only=False, lm_scale=lm_scale)
        updated, grad_norm = self._optimizer_step()
        stats = self._sum_stats(outputs)
        if not updated:
            self._report_nonfinite(outputs, grad_norm)
            stats = torch.zeros_like(stats)  # a skipped step's NaNs would poison the logged window
        return stats, grad_norm, updated

    def _report_nonfinite(self, outputs, grad_norm: float) -> None:
        entry, what = nonfinite_steps.locate(outputs, grad_norm, self.step + 1, self.loader, self.rt,
                                             self.is_last_stage)
        self.skipped_steps.append(entry)
        self.log(what)

    def _reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel replicas, then over the pipeline (only the last stage is non-zero)."""
        dist.all_reduce(stats, group=self.rt.groups.dp)
        dist.all_reduce(stats, group=self.rt.groups.pp)
        return stats

    def _step_flops(self, batch_indices: np.ndarray) -> float:
        """Model FLOPs of one global batch, forward + backward: dense matmuls per real token plus the
        attention of exactly the (query, key) pairs the shared-prefix mask allows."""
        per_seq = self.loader.source.per_sequence
        tokens = float(per_seq["tokens"][batch_indices].sum())
        pairs = float(per_seq["attention_pairs"][batch_indices].sum())
        return tokens * self._dense_flops + pairs * self._attn_flops

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Trains to train.steps or an early stop; -> the history. A SIGTERM on any rank stops every
        rank after the step it arrives in (an evaluation under way at its next batch): the step is
        saved, then StoppedBySignal is raised."""
        self.stops.install()
        try:
            history = self._fit()
        except BaseException as e:
            # a save written in the background holds a step from before the error: finished where
            # every rank can still take part, else left `.partial` with its writer stopped (the
            # interpreter would wait for it at exit); the error's output says which step was kept
            self.loader.close()
            kept = self.saves.leave() if self.saves is not None else ""
            if kept:
                e.add_note(kept)
            # no final evaluation follows: the logs are closed here, the wandb run marked failed by an error
            # (in a step, an evaluation, the final save), not by a SIGTERM's stop (StoppedBySignal); left to
            # wandb's exit hook, a run that failed in a step was marked finished
            self.log_final({}, e)
            # the window's trace (and memory snapshot) so far, where the error came outside a step
            profiling.failed(self._profiled, self.step, e)
            raise
        finally:
            self._profiled = None
            # a failed run (a non-finite streak, out of memory, Ctrl-C) stops reading ahead too,
            # instead of exiting only after the reads queued for steps it will not run
            self.loader.close()
            self.stops.uninstall()
            if self._progress is not None:  # open for the final evaluation, where SIGTERM ends the process
                self._progress.after_fit()
        if self.stops.sigterm.received and self.stopped_by != "SIGTERM":
            # it came after fit's last look (the same instant as fit ended): what it would have done
            # without the handler
            signal.raise_signal(signal.SIGTERM)
        return history

    def _fit(self) -> list[dict]:
        tc, lc = self.cfg.train, self.cfg.log
        self.stops.agree_on_signals()
        m = self.cfg.model
        self._dense_flops = dense_flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size,
                                                  m.num_attention_heads, m.num_query_groups,
                                                  lm_head_vocab=m.vocab_size if tc.aux_lm_weight > 0 else 0)
        self._attn_flops = attention_flops_per_pair(m.num_layers, m.hidden_size)
        peak = peak_tflops(self.rt.device)
        progress = Progress(
            tc.steps, self.step, self.rt.is_main,
            str(self.run_dir / "tensorboard") if lc.tensorboard else None,
            peak, self.rt.world_size,
            metrics_path=str(self.run_dir / metrics_file.NAME) if lc.metrics_file else None,
            wandb_run=dict(project=lc.wandb_project, name=lc.wandb_name, entity=lc.wandb_entity,
                           run_dir=self.run_dir, config=dataclasses.asdict(self.cfg),
                           # fit's SIGTERM handler noted it (its main thread runs), or there is none of fit's
                           sigterm_answered=lambda: self.stops.sigterm.received or not self.stops.sigterm.installed)
            if lc.wandb_project else None,
        )
        self._progress = progress  # closed by log_final: the entry script's, or fit's on an error or a stop
        if peak:
            sheet = spec_sheet_tflops(torch.cuda.get_device_name(self.rt.device))
            self.log(f"MFU against this card's measured dense bf16 peak: {peak:.0f} TFLOP/s"
                     + (f" (spec sheet {sheet:.0f})" if sheet else ""))
        self.log(
            f"training {self.num_parameters:,} parameters | layout tp={self.rt.tp} pp={self.rt.pp} "
            f"dp={self.rt.dp} vpp={self.rt.vpp} | {self._steps_left()} | packing efficiency "
            f"{self.loader.source.packing_efficiency:.1%} | {self.dtype} on {self.rt.device.type}, attention "
            f"{resolve_attention_backend(tc.attention_backend, self.rt.is_cuda, m.hidden_size // m.num_attention_heads)}"
        )
        if tc.exit_at_step and 0 < tc.exit_at_step <= self.step < tc.steps:
            # a requeued job that kept its exit_at_step would otherwise stop at once, every time
            self.log(f"train.exit_at_step={tc.exit_at_step} is not after the resumed step {self.step}: it has no "
                     f"effect, the run trains to train.steps={tc.steps} (set a later one to stop again)")
        self.stops.warn_standing_file(self.step)
        profiled = self._profiled = profiling.open_window(tc, self.rt, self.run_dir, self.step, self.log)  # None: off
        window = torch.zeros(STATS, device=self.rt.device)
        tokens = real_tokens = groups = 0
        flops = 0.0
        skipped_in_row = 0
        skipped_in_window = 0
        self.stops.begin()
        self.stopped_by = ""
        stop = False
        while self.step < tc.steps and not stop:
            batch_indices = self.loader.global_batch_indices(self.loader.state.consumed_batches)
            with profiling.around(profiled, self.step + 1):
                stats, grad_norm, updated = self.train_step()
            self.step += 1
            if updated:
                skipped_in_row = 0
            else:
                skipped_in_row += 1
                skipped_in_window += 1
                if skipped_in_row >= tc.max_nonfinite_steps:
                    self.finish_saves()  # every rank stops here: the checkpoint named below is complete
                    raise nonfinite_steps.streak_error(skipped_in_row, tc.max_nonfinite_steps, self.skipped_steps[-1],
                                                       checkpoint.latest(self.ckpt_dir))
            window += stats
            if updated:  # a skipped step trained on nothing: its batch stays out of the throughput
                real_tokens += self.loader.last_global["tokens"]
                groups += self.loader.last_global["groups"]
                tokens += tc.global_batch * self.loader.source.seq_length
                flops += self._step_flops(batch_indices)
            if self.step == progress.start_step + 1:  # the window's counts are this step's alone
                progress.first_step_done(tokens, real_tokens, groups, flops)
            exiting = bool(tc.exit_at_step) and self.step == tc.exit_at_step and self.step < tc.steps
            request = self.stop_request  # decided inside the step (StopAgreement.at_step)
            if self.step % lc.interval == 0 or self.step == tc.steps or exiting or request:
                s = self._reduce(window).tolist()
                row = progress.log(
                    # a window of skipped steps only counted nothing (their stats are zeroed): no value
                    self.step, s[0] / s[2] if s[2] > 0 else None, s[1] / s[3] if s[3] > 0 else None,
                    self.optimizer.param_groups[0]["lr"],
                    grad_norm, tokens, real_tokens, groups, flops,
                    lm_loss=s[4] / s[5] if s[5] > 0 else None,
                    skipped=skipped_in_window,
                )
                self.history.append(row)
                self.poll_saves()
                window.zero_()
                tokens = real_tokens = groups = skipped_in_window = 0
                flops = 0.0
            self.stops.announce(request, self.step)
            if request:
                self.stopped_by = request
                stop = True
            # a stop file's warning time, and a SIGTERM's grace before the SIGKILL that follows it, go to
            # the checkpoint, not to an evaluation due at this step (one due where a time limit or exit_at_step
            # ends the fit is kept in the history the checkpoint saves; the entry script's final evaluation
            # takes its results rather than evaluating the same weights again)
            evaluating = tc.eval_interval and self.step % tc.eval_interval == 0 and self.step < tc.steps \
                and self.stopped_by not in ("stop_file", "SIGTERM")
            if evaluating:
                with progress.paused():
                    stop = self._evaluate_all(progress) or stop
            saving = self.cfg.checkpoint.save_interval and self.step % self.cfg.checkpoint.save_interval == 0
            if saving:
                with progress.paused():
                    self.save()
            if (evaluating or saving) and not (stop or exiting) and self.step < tc.steps:
                what = " or ".join(w for w, done in (("an evaluation", evaluating), ("a checkpoint save", saving))
                                   if done)
                if self.stops.signalled_during(what, self.step):
                    self.stopped_by = "SIGTERM"
                stop = self.stopped_by == "SIGTERM"
            if exiting:
                self.log(f"train.exit_at_step={tc.exit_at_step} reached")
                self.stopped_by = "exit_at_step"
                stop = True
        if self.final_evaluation:
            progress.flush()
        else:
            self._progress = None
            progress.close()
        if profiled:
            profiled.close()  # a window an early stop or train.steps cut short
        self.loader.close()  # a batch read ahead for a step that an early stop will not run
        self.stops.end()
        self._save_last(stop)
        late = self.stops.checks_signals() and self.stopped_by != "SIGTERM"
        if late and self.stops.signalled_ranks()[0]:
            # received after the last step's check (in the last step, during the final save): the run
            # is done or saved, and stops for it all the same instead of going on to evaluate
            self.stopped_by = "SIGTERM"
            self._save_last(True)
        if self.stops.file_found:
            self.stops.remove_stop_file(self.step, self.ckpt_dir)
        if self.stopped_by == "SIGTERM":
            if self.rt.is_main:
                self.log(f"stopped for SIGTERM at step {self.step}: the checkpoint {checkpoint.latest(self.ckpt_dir)} "
                         f"is complete; exiting with status {EXIT_SIGTERM} (the same command resumes)")
                sys.stdout.flush()
                sys.stderr.flush()
            # rank 0's line is out before any rank exits
            dist.barrier()
            # torchrun sends SIGTERM to the workers still up once the first has exited: each rank is
            # on its way out with the status that says the run saved, which that signal would replace
            # (a rank without the handler keeps its program's own, and only the main thread may set one)
            if self.stops.sigterm.installed:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise StoppedBySignal(self.step)
        return self.history

    def log_final(self, results: dict, error: BaseException | None = None) -> None:
        """The final evaluation's results ({set: engine.evaluation.evaluate's figures}, at the last trained
        step; none where it was skipped) written where fit's figures went (engine.progress.Progress.log_eval,
        main rank), which are then closed. Nothing where they are closed already (fit closes them itself
        without final_evaluation, and on an error or a stop).
        `error`: the one the run ends with (the final evaluation's), its wandb run marked failed; a SIGTERM's
        stop (StoppedBySignal) is none: the run is saved and the same command resumes it."""
        progress, self._progress = self._progress, None
        if progress is None:
            return
        progress.rewrite_start_step(self.history)
        for name, result in results.items():
            progress.log_eval(self.step, name, result, final=True)
        progress.close(failed=error is not None and not isinstance(error, StoppedBySignal))

    def _steps_left(self) -> str:
        """The steps this fit trains: a resumed run trains what is left of train.steps, not all of them."""
        steps = self.cfg.train.steps
        if self.step >= steps:
            return f"nothing left to train (step {self.step} of {steps})"
        first = f"step {steps}" if self.step + 1 == steps else f"steps {self.step + 1}-{steps}"
        what = f"{first} of {steps} ({steps - self.step} left)" if self.step else f"{steps} steps"
        return f"{what} of {self.cfg.train.global_batch} packed sequences x {self.loader.source.seq_length} tokens"

    def _save_last(self, stop: bool) -> None:
        """An early stop (time limit, stop file, SIGTERM, exit step) always leaves a resumable checkpoint;
        the end of training too, unless checkpoint.save_at_end=false (a benchmark that needs no weights).
        Complete when this returns (before the run ends or answers a stop file)."""
        if self.last_saved_step != self.step and self.step > 0 and (stop or self.cfg.checkpoint.save_at_end):
            self.save()
        self.finish_saves()

    def _evaluate_all(self, progress: Progress) -> bool:
        """The periodic evaluation of every set; True where a stop request cut it short. A set cut
        short is not reported at all: its batches so far are the first of each rank's share, in the
        set's order, not a sample of it, and a number logged or kept in the history beside the whole
        set's would read as one; the sets done before it are reported, as they are whole."""
        for name, data in self.evals.items():
            try:
                res = self.evaluate(data)
            except EvaluationStopped as cut:
                who = (f"SIGTERM received (by {self.stops.ranks} of {self.rt.world_size} rank(s))" if
                       cut.request == "SIGTERM" else f"train.stop_file {self.cfg.train.stop_file} found")
                self.log(f"{who} during the evaluation of {name} at step {self.step}: stopped after {cut.done} of "
                         f"its {cut.total} batches, not reported; saving and stopping")
                self.stopped_by = cut.request
                return True
            self.history.append({"step": self.step, "eval": name, **res})
            progress.log_eval(self.step, name, res)
        return False

    def evaluate(self, data) -> dict:
        """Pairwise accuracy and loss over every group of `data` (engine.evaluation.evaluate); inside
        fit it stops at a stop request (EvaluationStopped), after it (the final one) it does not."""
        return evaluate(self, data, partial(self.stops.agree, False) if self.stops.running else None)
