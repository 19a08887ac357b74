"""Steps skipped for a non-finite loss or gradient: where the bad values came from (data-parallel
rank, micro-batch, packed sequences of the data), recorded in the trainer's history and logged, and
the error that ends a run after train.max_nonfinite_steps of them in a row. A rare path: it syncs
with the host freely."""
from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def locate(outputs, grad_norm: float, step: int, loader, rt, is_last_stage: bool) -> tuple[dict, str]:
    """(the skipped_steps entry, the log line) of skipped `step`: per (data-parallel rank, micro-batch),
    whether its loss was non-finite on the last stage (one all-reduce over every rank)."""
    n_mb = max(1, loader.global_batch // (rt.dp * loader.micro_batch))
    bad = torch.zeros(rt.dp, n_mb, device=rt.device)
    if is_last_stage:
        for j, o in enumerate(outputs):
            bad[rt.dp_rank, j] = float(not bool(torch.isfinite(o["stats"]).all()))
    dist.all_reduce(bad)
    where = [(int(r), int(j)) for r, j in torch.nonzero(bad > 0).tolist()]
    batch_number = loader.state.consumed_batches - 1
    per_rank = loader.global_batch // rt.dp
    indices = loader.global_batch_indices(batch_number)
    sequences = sorted({int(s) for r, j in where
                        for s in indices[r * per_rank + j * loader.micro_batch:
                                         r * per_rank + (j + 1) * loader.micro_batch]})
    entry = {"step": step, "grad_norm": grad_norm, "global_batch": batch_number,
             "micro_batches": [{"dp_rank": r, "micro_batch": j} for r, j in where],
             "sequences": sequences}
    what = (f"non-finite loss in micro-batch(es) {', '.join(f'{j} of data-parallel rank {r}' for r, j in where)} "
            f"(packed sequences {sequences} of the data)" if where else "finite losses but non-finite gradients")
    return entry, f"step {step}: skipped (no update): grad norm {grad_norm}, {what}; global batch {batch_number}"


def streak_error(in_row: int, limit: int, last: dict, saved: str | None) -> NonFiniteError:
    """The error ending a run whose last `in_row` steps were skipped (`last`: the newest entry of
    locate; `saved`: the newest complete checkpoint, if any)."""
    restart = (f"start a new run (a new run_dir) from its weights with a lower train.lr "
               f"(checkpoint.init_from={saved})" if saved else "start again with a lower train.lr")
    return NonFiniteError(
        f"{in_row} optimizer steps in a row had a non-finite loss or gradient "
        f"(train.max_nonfinite_steps={limit}); the last: step {last['step']}, "
        f"global batch {last['global_batch']}, micro-batches {last['micro_batches']}, packed "
        f"sequences {last['sequences']}. Every skipped step is listed in the log above; check "
        f"the data at those positions, resume from the last checkpoint (train.grad_clip may "
        f"change; the optimizer and schedule settings may not), or {restart}")
