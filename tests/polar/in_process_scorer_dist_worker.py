"""InProcessScorer in a trainer's distributed workers, under torchrun over gloo (2 ranks): the process
group started here as a trainer starts its own (megatron's state not set up), then in turn:
`rank0_alone`: rank 0 alone loads (join_timeout_s 3) while rank 1 goes on to a barrier;
`every_rank`: every rank loads and scores its own items (ITEMS[rank]), the torch generator's state compared
before and after the load; `rank0_alone_tp1`: rank 0 alone loads again, megatron's state now set up (at the
scorer's tp=1, as the load left it or a megatron trainer at tp=1 has it); `megatron_tp2`: megatron's state
set up at tp=2 (engine.runtime.init_runtime, as a megatron trainer has it), then rank 0 alone loads (a
refusal must come before any wait for the others).
Writes OUT.rankN (JSON): each scenario's refusal ("TypeName: message"), rewards and whether the generator
was kept. RANK, LOCAL_RANK and WORLD_SIZE leave the environment once the group has started, as a Ray
worker has none. `python in_process_scorer_dist_worker.py CHECKPOINT OUT`.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ITEMS = [[{"prompt": f"question {r}.{i}", "reference": f"answer {i}", "output": "reply " * (i + 1)}
          for i in range(3)] for r in range(2)]


def refusal(checkpoint: str, **kw) -> str | None:
    from polar.in_process_scorer import InProcessScorer

    try:
        InProcessScorer.load(checkpoint, **kw).close()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def main(checkpoint: str, out: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))  # the trainer's group
    rank = dist.get_rank()
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # a Ray worker's group is started without them
        os.environ.pop(name)
    result = {"rank0_alone": refusal(checkpoint, join_timeout_s=3) if rank == 0 else None}
    dist.barrier()

    from polar.in_process_scorer import InProcessScorer

    before = torch.get_rng_state()
    scorer = InProcessScorer.load(checkpoint)
    result["rng_kept"] = torch.equal(before, torch.get_rng_state())
    result["rewards"] = scorer.score(ITEMS[rank])
    result["runtime_rank"] = scorer.scorer.rt.rank
    scorer.close()
    result["rank0_alone_tp1"] = refusal(checkpoint, join_timeout_s=3) if rank == 0 else None
    dist.barrier()

    from megatron.core import parallel_state

    from engine.config import ParallelConfig
    from engine.runtime import init_runtime, shutdown_runtime

    parallel_state.destroy_model_parallel()
    init_runtime(ParallelConfig(tp=2, distributed_optimizer=False), seed=1)
    result["megatron_tp2"] = refusal(checkpoint, join_timeout_s=60) if rank == 0 else None
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(result, f)
    shutdown_runtime()


if __name__ == "__main__":
    main(*sys.argv[1:3])
