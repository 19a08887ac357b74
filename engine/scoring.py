"""Forward-only scoring: the reward of every candidate of a list of packed batches, at any layout.

Megatron's pipeline schedule runs the forward passes (so TP, PP and interleaved PP all work); the
last pipeline stage collects the rewards, and one all-reduce over the pipeline group hands them to
every rank (the other stages contribute zeros). Pipeline stages exchange fixed-shape [s, b, h]
activations, so batches are scheduled in runs of equal shape, one schedule call per shape.

Data parallelism is the caller's choice: `score` scores what it is given (every DP rank the same
list, or each its own share); `score_data_parallel` splits one list over the DP ranks and gathers
the rewards back into input order.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from engine.packing import PackedBatch


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch.tokens, batch.layout, batch.reward_index)

    def collect(output):
        rewards = output[: batch.reward_index.numel()].float()  # an LM head appends its loss: dropped
        return rewards.sum() * 0.0, torch.ones((), dtype=torch.int, device=rewards.device), {"rewards": rewards}

    return output, collect


def _run_same_shape(chunks, batches: list[PackedBatch], rt) -> list[torch.Tensor]:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    b, length = batches[0].tokens.shape
    iters = [iter(batches) for _ in chunks]
    config = chunks[0].config if hasattr(chunks[0], "config") else chunks[0].module.config
    outputs = get_forward_backward_func(rt.pp, rt.vpp)(
        forward_step_func=_forward_step,
        data_iterator=iters if len(iters) > 1 else iters[0],
        model=chunks,
        num_microbatches=len(batches),
        seq_length=length,
        micro_batch_size=b,
        forward_only=True,
        p2p_communicator=P2PCommunicator(rt.groups.pp, config),
        pg_collection=rt.groups,
    )
    return [o["rewards"] for o in outputs]


@torch.no_grad()
def score(chunks, batches: list[PackedBatch], rt, *, per_call: int = 64, progress=None) -> torch.Tensor:
    """Rewards fp32 [sum of candidates], batch by batch in the given order and, within a batch, in
    engine.packing.collate's candidate order; identical on every rank of the pipeline group (and,
    since the readout is replicated over TP, of the model-parallel group).

    Batches of different shapes are fine: consecutive batches of one shape share a schedule call, of
    at most `per_call` batches (rounded down to a multiple of parallel.pp), moved to the device one
    call at a time: a large input never sits on the GPU whole. With interleaved pipelining megatron
    needs the micro-batches of a call to be a multiple of parallel.pp: run such layouts with batch
    counts that satisfy it (or one shape per call). `progress(done, total)`, when given, is called
    after each schedule call with the batches scored so far. `rt` is the engine.runtime.Runtime:
    its device and process groups."""
    device = rt.device
    counts = [int(bt.reward_index.numel()) for bt in batches]
    total = sum(counts)
    rewards = torch.zeros(total, dtype=torch.float32, device=device)
    if not batches:
        return rewards
    per_call = max(rt.pp, per_call // rt.pp * rt.pp)
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        last = rt.is_last_stage()
        pieces: list[torch.Tensor] = []
        start = 0
        while start < len(batches):
            end = start
            while (end < len(batches) and end - start < per_call
                   and batches[end].tokens.shape == batches[start].tokens.shape):
                end += 1
            out = _run_same_shape(chunks, [bt.to(device) for bt in batches[start:end]], rt)
            if last:
                pieces.extend(out)
            start = end
            if progress is not None:
                progress(start, len(batches))
        if last:
            rewards = torch.cat(pieces)
            if rewards.numel() != total:
                raise RuntimeError(f"scoring returned {rewards.numel()} rewards for {total} candidates")
    finally:
        for c, t in zip(chunks, was_training):
            c.train(t)
    if rt.pp > 1:
        dist.all_reduce(rewards, group=rt.groups.pp)
    return rewards


@torch.no_grad()
def score_data_parallel(chunks, batches: list[PackedBatch], rt, **kw) -> torch.Tensor:
    """`batches` is the same full list on every rank; data-parallel rank r scores batches r, r+dp,
    ... and the rewards of all of them come back in input order, on every rank. `kw` goes to
    `score` (its `progress` counts this rank's share)."""
    device = rt.device
    dp = rt.dp
    if dp == 1:
        return score(chunks, batches, rt, **kw)
    r = rt.dp_rank
    counts = [int(bt.reward_index.numel()) for bt in batches]
    mine = score(chunks, batches[r::dp], rt, **kw)
    width = max(sum(counts[q::dp]) for q in range(dp))
    padded = torch.zeros(width, dtype=torch.float32, device=device)
    padded[: mine.numel()] = mine
    gathered = [torch.empty_like(padded) for _ in range(dp)]
    dist.all_gather(gathered, padded, group=rt.groups.dp)
    # rank q's rewards hold batches q, q+dp, ... back to back: cut them per batch, then interleave
    per_batch: list[torch.Tensor] = [None] * len(batches)  # type: ignore[list-item]
    for q in range(dp):
        offsets = list(itertools.accumulate(counts[q::dp], initial=0))  # host ints: no tensor round trip
        for j, idx in enumerate(range(q, len(batches), dp)):
            per_batch[idx] = gathered[q][offsets[j]:offsets[j + 1]]
    return torch.cat(per_batch) if per_batch else torch.zeros(0, device=device)


def rewards_per_group(rewards, order: list, candidates: list) -> list:
    """The rewards (a 1-D tensor in collate's order: group order[k] holds the next candidates[k]) as
    a list of floats per group, in the groups' order. One tolist and list slices: a tensor slice and
    tolist per group cost several times as much (benchmarks/score_pack.py); polar score's mapping
    (engine/score.py)."""
    flat = rewards.tolist()
    per_group: list = [None] * len(order)
    start = 0
    for g, n in zip(order, candidates):
        per_group[g] = flat[start:start + n]
        start += n
    return per_group
