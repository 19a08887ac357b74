"""What the ranks of `polar score` (engine/score.py; its run over the file is polar/score_run.py's) exchange:
where a partial output continues, the first line too long for --seq-length that their shares of the input's
check found, and each model replica's share of a chunk once it is scored."""
from __future__ import annotations

from engine.config import ConfigError


def gathered(share: tuple, rt) -> tuple:
    """Every replica's share of a chunk, on every rank: (outcomes merged, facts per replica, cuts per
    replica). The TP and PP ranks of a replica hold the same share; one copy per replica counts."""
    import torch.distributed as dist

    outcome, facts, cuts = share
    if rt.dp == 1:
        return outcome, [facts], [cuts]
    shares = [None] * rt.dp
    dist.all_gather_object(shares, share, group=rt.groups.dp)
    merged = {}
    for o, _, _ in shares:
        merged.update(o)
    return merged, [f for _, f, _ in shares], [c for _, _, c in shares]


def same_on_every_rank(done: int, rt) -> None:
    """Every rank reads the partial output to know where to continue; one that saw another file (an
    --output not on a file system every node shares) would score other lines than rank 0 writes."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    seen = torch.tensor([done, -done], dtype=torch.int64, device=rt.device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    if int(seen[0]) != -int(seen[1]):
        raise ConfigError(f"the ranks found different partial outputs beside --output (between {-int(seen[1])} and "
                          f"{int(seen[0])} rows): --output must be on a file system every node shares")


def earliest(found, rt):
    """The least of the ranks' `found` (a (line, ...) tuple, or None for nothing found), on every
    rank: each rank checked its own share of the input's lines, and all of them stop at the first
    line that any found, with one message."""
    import torch.distributed as dist

    if rt is None or rt.world_size == 1:
        return found
    everyone = [None] * rt.world_size
    dist.all_gather_object(everyone, found)
    return min((f for f in everyone if f is not None), default=None)
