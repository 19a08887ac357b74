"""What a resumed run must agree with in the step it resumes from, checked before the load (megatron
would ignore a changed setting, or fail deep inside the load): the optimizer, schedule, loss and
data-order settings, and, for an optimizer state saved as dp_reshardable, the layout and the gradient
buckets it lies in; and the notes of what a resume takes otherwise than the step was saved with (another
parallel layout, a dataset moved, evaluation sets changed, gone or new), which the trainer logs once. The
trainer records them at save (engine.trainer.Trainer.save); engine.checkpoint reads the step's state
(read_state)."""
from __future__ import annotations

import os

from engine.checkpoint import CheckpointError, read_state
from engine.checkpoint_load import tensors_metadata
from engine.config import ConfigError
from engine.data import set_digest

# train settings the optimizer state and the schedule are made of. megatron restores Adam's
# hyper-parameters and the schedule (warm-up, decay length, weight decay) from a checkpoint, and
# refuses optimizer state whose param groups name another lr, so a change on resume would be
# ignored or crash; it is refused instead. train.grad_clip is read afresh every step: it may change.
OPTIMIZER_SETTINGS = ("lr", "min_lr_ratio", "warmup_steps", "steps", "weight_decay", "adam_beta1", "adam_beta2",
                      "adam_eps")
# what the steps optimise: a resume that changed them went on with another objective, without a word
LOSS_SETTINGS = ("loss", "aux_lm_weight")
# recorded in the loader state (engine.data): the data order is a function of them
ORDER_SETTINGS = ("global_batch", "seed")


def data_settings(cfg) -> dict:
    """The settings the training data is made of, which a step records (its trainer state's
    `data_settings`) and a resume must keep. A built dataset (data.path) is packed already; the entry
    script's own data (data.path empty) is packed here (data.packing) from what its config class names
    in DATA_SETTINGS (the pre-training recipe's synthetic.*)."""
    out = {"data.seq_length": cfg.data.seq_length, "data.path": cfg.data.path}
    if not cfg.data.path:
        out["data.packing"] = cfg.data.packing
        for name in getattr(cfg, "DATA_SETTINGS", ()):
            section, key = name.split(".", 1)
            out[name] = getattr(getattr(cfg, section), key)
    return out


def check_resume_data_settings(step_dir: str, now: dict, state: dict | None = None,
                               sequences: int | None = None) -> list[str]:
    """ConfigError naming every data setting (data_settings) that differs from what the step was saved
    with: the loader's own check (engine.data) tells only that the order or the digest changed. Two
    data.path values are one dataset moved or copied (to a node's local disk, say) unless its packed
    sequence count (`sequences`, where the caller knows it) differs from the step's; the digest check
    stays the backstop; two naming one directory (a trailing slash, relative and absolute) are the
    same path. -> the note saying a data.path was taken as the step's dataset moved (the
    trainer logs it; [] when none). A step saved before the settings were recorded is not checked."""
    state = read_state(step_dir) if state is None else state
    saved = state.get("data_settings")
    if not isinstance(saved, dict):
        return []
    changed = [name for name in saved if name in now and saved[name] != now[name]]
    saved_count = state.get("loader", {}).get("sequences")
    notes = []
    two_paths = "data.path" in changed and saved["data.path"] and now["data.path"]
    if two_paths and os.path.realpath(saved["data.path"]) == os.path.realpath(now["data.path"]):
        # one directory written otherwise ("ds/", "./ds", absolute): no move, and no data.path change to
        # name; a dataset rebuilt in place is the data order's check to refuse (it names the count)
        changed.remove("data.path")
    elif two_paths and (sequences is None or saved_count in (None, sequences)):
        changed.remove("data.path")
        # silent, a path that named another dataset of the same size left the user no clue which one ran
        notes.append(f"note: data.path={now['data.path']} now, {saved['data.path']} when {step_dir} was saved: "
                     f"resuming on it as that dataset moved or copied (the data order's checks compare its "
                     f"packed sequences with the step's record, and refuse another dataset)")
    if changed:
        def shown(v):
            return "(empty)" if v == "" else v

        raise ConfigError(
            f"resuming from {step_dir}: "
            + "; ".join(f"{name}={shown(saved[name])} when saved, {shown(now[name])} now" for name in changed)
            + f". The run's training data is made from these settings: resuming would train on other data, or in "
              f"another order; set them back, or start a new run (a new run_dir) from its weights with "
              f"checkpoint.init_from={step_dir} (weights only: optimizer, schedule and data order start afresh)")
    return notes


def eval_sets(evals: dict, step: int, saved: dict | None) -> dict:
    """What a step records of the run's evaluation sets (its trainer state's `eval_sets`): per set its
    digest (engine.data.set_digest) and `after_step`, the step after which the run's evaluations of it
    are of this set (0: all of them). Changing a held-out set between a run and its resume can be
    deliberate, so it is no refusal, but the eval history then holds two sets' numbers: this says from
    where. On resume from step `step`, `saved` is that step's record: a set of the digest saved keeps its
    after_step, one that changed (or is new) takes `step`; a step saved before the record (None) leaves
    it unknown (no after_step). A run's start: step 0, nothing saved ({})."""
    out = {}
    for name, data in evals.items():
        digest = set_digest(data)
        was = saved.get(name) if isinstance(saved, dict) else None
        if saved is None:
            out[name] = {"digest": digest}
        elif isinstance(was, dict) and was.get("digest") == digest:
            out[name] = {k: v for k, v in was.items() if k in ("digest", "after_step")}
        else:
            out[name] = {"digest": digest, "after_step": step}
    return out


def changed_eval_sets(state: dict, evals: dict) -> dict:
    """name -> (digest when saved, digest now) for each evaluation set of `evals` the step recorded
    (eval_sets) with another digest; none for a step saved before the record."""
    saved = state.get("eval_sets")
    if not isinstance(saved, dict):
        return {}
    now = eval_sets(evals, int(state.get("step", 0)), saved)
    return {name: (saved[name].get("digest"), rec["digest"]) for name, rec in now.items()
            if isinstance(saved.get(name), dict) and saved[name].get("digest") != rec["digest"]}


def eval_set_notes(step_dir: str, state: dict, evals: dict, held_file: str = "") -> list[str]:
    """Every note a resume from `step_dir` gives (rank 0) of the run's evaluation sets against those the
    step (its `state`) recorded: a set changed since (changed_eval_sets), whose history rows up to the
    step are of the old set; one no longer evaluated, which keeps its rows in the history that
    summary.json's eval_sets no longer names; one new to the run, with rows only after the step. No
    refusal: each may be meant. `held_file`: the setting giving the held-out file
    ("data.eval_path=ds_eval/"), named in a changed set's note when the run has that one set. None for
    a step saved before the record (its sets are unknown)."""
    saved = state.get("eval_sets")
    if not isinstance(saved, dict):
        return []
    step = int(state.get("step", 0))
    given = f" ({held_file})" if held_file and len(evals) == 1 else ""
    notes = [f"note: the {name} set{given} is not the one {step_dir} was evaluated on (digest {was} when "
             f"saved, {now} now); resuming with it, not refused: the eval history's {name} rows up to "
             f"step {step} are of the old set, from step {step + 1} on (and the final evaluation) of this one "
             f"(summary.json: eval_sets.{name}.after_step={step})"
             for name, (was, now) in changed_eval_sets(state, evals).items()]
    for name in saved:
        if name not in evals:
            rows = [row["step"] for row in state.get("history", []) if row.get("eval") == name]
            end = (f"its rows in the eval history end at step {max(rows)}" if rows
                   else "the eval history has no rows of it")
            notes.append(f"note: the evaluation set {name} recorded by {step_dir} is not in this run: {end} "
                         f"(summary.json's eval_sets no longer lists it)")
    notes += [f"note: the evaluation set {name} is new since {step_dir}: its history starts after step {step} "
              f"(summary.json: eval_sets.{name}.after_step={step})" for name in evals if name not in saved]
    return notes


def optimizer_settings(train) -> dict:
    """The settings a step records (its trainer state's `settings`) and a resume must keep."""
    return {f"train.{name}": getattr(train, name) for name in OPTIMIZER_SETTINGS + LOSS_SETTINGS}


def check_resume_settings(step_dir: str, train, skip=(), derived_from=None, state: dict | None = None) -> None:
    """Raises ConfigError naming every optimizer, schedule, loss and data-order setting (engine.config.
    TrainConfig) that differs from what the step was saved with, except those in `skip` (settings
    not known yet). `derived_from` maps a setting a recipe computes to the setting the user sets
    (the message names that one). A step saved before settings were recorded is not checked.
    `state`: the step's read_state, where the caller has it."""
    state = read_state(step_dir) if state is None else state
    saved = dict(state.get("settings", {}))
    loader = state.get("loader", {})
    saved.update({f"train.{name}": loader[name] for name in ORDER_SETTINGS if name in loader})
    now = {name: getattr(train, name.split(".", 1)[1]) for name in saved}
    derived_from = derived_from or {}
    changed = [f"{name}={value} when saved, {now[name]} now"
               + (f" (derived from {derived_from[name]} and the data: set {derived_from[name]} and the data back as "
                  "they were)" if name in derived_from else "")
               for name, value in saved.items() if name not in skip and now[name] != value]
    if changed:
        raise ConfigError(
            f"resuming from {step_dir}: {'; '.join(changed)}. A run resumes with the optimizer, schedule, loss and "
            f"data-order settings it was saved with: set them back, or start a new run (a new run_dir) from its "
            f"weights with checkpoint.init_from={step_dir} (weights only: optimizer, schedule and data order "
            f"start afresh)")


def check_resume_layout(step_dir: str, tp: int, pp: int, vpp: int | None, state: dict | None = None,
                        distributed_optimizer: bool = True, dp: int | None = None) -> list[str]:
    """ConfigError unless this layout can load the step's optimizer state: one saved as
    dp_reshardable (megatron's distributed-optimizer buffers as they lie) loads only into the
    distributed optimizer, at the TP, PP and VPP it was saved at; megatron would fail inside the
    load, or read the wrong slices. -> the note of a layout (with `dp`, the data-parallel size too)
    other than the step's that resumes (the trainer logs it; [] when the same or none recorded)."""
    state = read_state(step_dir) if state is None else state
    notes = _layout_notes(step_dir, state.get("layout"), {"tp": tp, "pp": pp, "dp": dp, "vpp": vpp})
    dp_reshardable = state.get("optimizer_format") == "dp_reshardable"
    if not dp_reshardable:
        saved = state.get("distributed_optimizer")  # recorded since; a dp_reshardable state implies it
        if saved is not None and saved != distributed_optimizer:
            # megatron's plain optimizer saves and loads its state per parameter, the distributed one
            # in param groups of its own: neither reads the other's (a raw ValueError, or a KeyError
            # that read as damaged files)
            raise ConfigError(
                f"resuming from {step_dir}: parallel.distributed_optimizer={str(saved).lower()} when saved, "
                f"{str(distributed_optimizer).lower()} now. The plain and the distributed optimizer do not read "
                f"each other's state: set it back, or start a new run (a new run_dir) from its weights with "
                f"checkpoint.init_from={step_dir} (weights load either way; optimizer, schedule and data order "
                f"start afresh)")
        return notes
    if not distributed_optimizer:
        # the plain optimizer asks for per-parameter tensors that the buckets do not hold: the load
        # fails as if the files were damaged
        raise ConfigError(
            f"resuming from {step_dir}: parallel.distributed_optimizer=false now. Its optimizer state was saved "
            f"with checkpoint.optimizer_format=dp_reshardable, which only the distributed optimizer reads: set "
            f"parallel.distributed_optimizer=true, or start a new run (a new run_dir) from its weights with "
            f"checkpoint.init_from={step_dir} (weights load at any layout; optimizer, schedule and data order "
            f"start afresh)")
    saved = state.get("layout")
    if not saved:
        return notes
    now = {"tp": tp, "pp": pp, "vpp": vpp}
    changed = [f"parallel.{k}={saved.get(k)} when saved, {v} now" for k, v in now.items() if saved.get(k) != v]
    if changed:
        raise ConfigError(
            f"resuming from {step_dir}: {'; '.join(changed)}. Its optimizer state was saved with "
            f"checkpoint.optimizer_format=dp_reshardable, which loads only at the tensor/pipeline layout it was "
            f"saved at (any data-parallel size): set "
            + " ".join(f"parallel.{k}={'null' if saved.get(k) is None else saved.get(k)}"
                       for k in now if saved.get(k) != now[k])
            + f", or start a new run (a new run_dir) from its weights with checkpoint.init_from={step_dir} "
            f"(weights load at any layout; optimizer, schedule and data order start afresh)")
    return notes


def _layout_notes(step_dir: str, saved, now: dict) -> list[str]:
    """The note of a resume at another parallel layout than the step's (`saved`, its trainer state's
    `layout`; `now` the run's, a None dp unknown), which loads (check_resume_layout refuses what does
    not): silent, it left a cluster user to guess whether the new layout had been taken, and what of
    the run it changes."""
    if not isinstance(saved, dict):
        return []
    keys = ["tp", "pp", *(["dp"] if now.get("dp") is not None else []), "vpp"]
    if all(saved.get(k) == now.get(k) for k in keys):
        return []

    def shown(layout):
        return " ".join(f"{k}={layout.get(k)}" for k in keys)

    # the loader's position and order are global (engine.data.GlobalBatchLoader): a new DP size splits
    # the same global batches otherwise; sums reduced over other ranks round in another order
    return [f"note: {step_dir} was saved at layout {shown(saved)}, this run is at {shown(now)}: its weights and "
            f"optimizer state are resharded as they load, and the training goes on with the same global batches "
            f"in the same order (train.global_batch, train.seed); the losses may differ from an uninterrupted "
            f"run's in the last digits (sums reduced in another order)"]


def check_resume_norm_dtypes(step_dir: str) -> None:
    """ConfigError for a step a bf16 run saved while its layers' RMSNorm weights were built in fp32
    beside a bf16 final norm (before the norms took the training dtype): megatron's distributed
    optimizer keys a param group's state by the group's order, and the inner optimizer had put that
    group's fp32 tensors first, so each norm's fp32 main weights and Adam moments lie under another
    norm's name (its own code read them back with the same shift; this one would give every norm a
    neighbour's state, in a dp_reshardable state a bucket layout no setting brings back). The model
    weights are exact, so a new run can start from them."""
    try:
        found = tensors_metadata(step_dir)
    except CheckpointError:  # a missing or damaged .metadata is named by the load itself
        return
    final = found.get("final_norm.weight")
    if final is None:
        return
    mixed = sorted(k for k, t in found.items() if k.endswith("layer_norm_weight") and not k.startswith("optimizer.")
                   and getattr(t, "dtype", final.dtype) != final.dtype)
    if mixed:
        raise ConfigError(
            f"resuming from {step_dir}: it was saved with its layers' norm weights in "
            f"{str(found[mixed[0]].dtype).replace('torch.', '')} beside a {str(final.dtype).replace('torch.', '')} "
            f"final norm (a {str(final.dtype).replace('torch.', '')} run before the norms were built in the training "
            f"dtype), and its optimizer state for those norms is stored under each other's names, so it cannot be "
            f"resumed; its weights are exact: start a new run (a new run_dir) from them with "
            f"checkpoint.init_from={step_dir}")


def optimizer_buckets(optimizer) -> list:
    """The distributed optimizer's gradient buckets (elements of each, per buffer, per optimizer in
    the chain): the layout a dp_reshardable state is written in. megatron sizes buckets from
    parallel.overlap_grad_reduce (one bucket without it) and, with it, from the data-parallel size
    above 40 replicas."""
    return [[next(iter(b.values())) for b in getattr(opt, "per_bucket_numel_unpadded", [])]
            for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def check_resume_buckets(step_dir: str, optimizer, state: dict) -> None:
    """ConfigError unless this run's gradient buckets are those a dp_reshardable state was saved in
    (megatron asserts it deep inside the load)."""
    saved = state.get("optimizer_buckets")
    if state.get("optimizer_format") != "dp_reshardable" or saved is None:
        return
    now = optimizer_buckets(optimizer)
    if now != saved:
        raise ConfigError(
            f"resuming from {step_dir}: its optimizer state was saved with checkpoint.optimizer_format=dp_reshardable "
            f"in gradient buckets of {saved} elements, this run has {now}. megatron sizes them from "
            f"parallel.overlap_grad_reduce and, with it on, from the data-parallel size above 40 replicas: resume "
            f"with the overlap setting (and, above 40 replicas, the data-parallel size) it was saved with, or start "
            f"a new run (a new run_dir) from its weights with checkpoint.init_from={step_dir}")
