"""`polar data synthetic`: the embedded default's synthetic policies written as the files the other
tools read, so every command of the README runs on a fresh machine without data of one's own.

    polar data synthetic triplets -o triplets.jsonl   # pre-training records (polar data build)
    polar data synthetic prefs -o prefs.jsonl         # preference records (polar finetune)
    polar data synthetic items -o items.jsonl         # groups of rollouts to score (polar score)
    polar data synthetic ranked -o ranked.jsonl       # ranked responses (polar eval)

The pool is the one `engine/pretrain.py` trains on by default (polar/pretrain_data.py: the same
seed, policies and prompts), split the same way into the policies it trains on (`seen`) and those
it never sees (`held-out`); the texts are fresh draws, not the run's own triplets. Every line
names its policies, so what a model should prefer is in the file: in a triplet or preference
record the reference and `chosen` come from one policy and `rejected` from another (POLAR's
pre-training pairs, paper Sec. 2.2); in a group one candidate shares the reference's policy; in a
ranked record rank 2 shares the reference's (rank 1) policy and rank 3 does not.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from engine.cli_types import ArgumentParser
from engine.durable_file import Replacement

KINDS = {"triplets": "seen", "prefs": "held-out", "items": "held-out", "ranked": "both"}  # kind -> its policies


def _pool(seed: int, train_policies: int, held_out_policies: int, prompts: int):
    from polar.synthetic import make_pool, make_prompts

    pool = make_pool(seed, train_policies + held_out_policies)
    return {"seen": pool[:train_policies], "held-out": pool[train_policies:]}, make_prompts(seed, prompts)


def _draw(policies, rng: np.random.Generator, n: int, per_row: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """[n, len(per_row)] texts and their policy indexes: column "a" the row's policy A, "o" another
    policy each (distinct within a row), texts of a policy drawn in one batch."""
    k = len(policies)
    others = per_row.count("o")
    if others + 1 > k:
        raise ValueError(f"{others + 1} distinct policies a line, but the pool has {k}")
    owner = np.empty((n, len(per_row)), dtype=np.int64)
    a = rng.integers(0, k, n)
    # the others: A's successors at distinct random offsets, so never A and never each other
    offsets = np.argsort(rng.random((n, k - 1)), axis=1)[:, :others] + 1
    cols = iter(offsets.T)
    for j, who in enumerate(per_row):
        owner[:, j] = a if who == "a" else (a + next(cols)) % k
    texts = np.empty(owner.shape, dtype=object)
    for p in np.unique(owner):
        where = np.flatnonzero(owner.ravel() == p)
        texts.ravel()[where] = np.array(policies[p].sample(rng, len(where)), dtype=object)
    return texts, owner


def make_lines(kind: str, n: int, seed: int = 0, policies: str | None = None, wrapper: str = "sft",
               candidates: int = 4, train_policies: int = 160, held_out_policies: int = 40,
               prompts: int = 5000, part: int = 0) -> list[dict]:
    """The `n` JSON lines of `kind` (module docstring), the same for the same arguments; another
    `part` draws independently from the same pool (a training file and its held-out file)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    which = policies or KINDS[kind]
    sets, prompt_pool = _pool(seed, train_policies, held_out_policies, prompts)
    # a stream of its own per kind and policy set: not the run's triplets (rng [seed, 1]), nor each other's
    rng = np.random.default_rng([seed, 2, list(KINDS).index(kind), ("seen", "held-out", "both").index(which), part])
    names = ["seen", "held-out"] if which == "both" else [which]
    where = rng.integers(0, len(names), n)
    out: list[dict | None] = [None] * n
    for s, name in enumerate(names):
        rows = np.flatnonzero(where == s)
        pol = sets[name]
        layout = ["a", "a"] + ["o"] * ((candidates if kind == "items" else 2) - 1)
        texts, owner = _draw(pol, rng, len(rows), layout)
        pids = np.array([q.id for q in pol])[owner]
        prompt_idx = rng.integers(0, len(prompt_pool), len(rows))
        if kind == "items":  # the reference's policy at a random place among the candidates
            order = np.argsort(rng.random((len(rows), candidates)), axis=1)
        for r, row in enumerate(rows.tolist()):
            t, p = texts[r].tolist(), pids[r].tolist()
            line = {"prompt": prompt_pool[prompt_idx[r]], "reference": t[0]}
            if kind in ("triplets", "prefs"):
                line.update(chosen=t[1], rejected=t[2], wrapper=wrapper, policy_a=p[0], policy_b=p[2])
            elif kind == "items":
                line.update(candidates=[{"text": t[1 + j], "policy": p[1 + j]} for j in order[r].tolist()],
                            reference_policy=p[0], wrapper=wrapper)
            else:
                line.update(category=f"{name} policies", wrapper=wrapper,
                            responses=[{"text": t[0], "rank": 1, "policy": p[0]},
                                       {"text": t[1], "rank": 2, "policy": p[1]},
                                       {"text": t[2], "rank": 3, "policy": p[2]}])
                del line["reference"]  # a ranked record's reference is its rank-1 response
            out[row] = line
    return out


def build_parser() -> argparse.ArgumentParser:
    from polar.pretrain_data import SyntheticDataConfig

    d = SyntheticDataConfig()
    ap = ArgumentParser(prog="polar data synthetic", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("kind", choices=tuple(KINDS))
    ap.add_argument("-o", "--output", required=True, help="the JSONL file to write")
    ap.add_argument("-n", "--lines", type=int, default=200, help="lines to write (default 200)")
    ap.add_argument("--policies", choices=("seen", "held-out", "both"),
                    help="the policies the lines come from: those the default run trains on, the others, or "
                         "both (ranked records then name theirs in `category`); default: triplets seen, prefs "
                         "and items held-out, ranked both")
    ap.add_argument("--wrapper", choices=("sft", "pretrain"), default=d.wrapper,
                    help=f"the input template the lines ask for (default {d.wrapper}, the default run's)")
    ap.add_argument("--candidates", type=int, default=4, help="items: candidates a group (default 4)")
    ap.add_argument("--seed", type=int, default=d.seed, help=f"the pool's seed (default {d.seed}, the default run's)")
    ap.add_argument("--part", type=int, default=0,
                    help="which independent draw from the pool (default 0): files of other parts share no draw, "
                         "e.g. training records (part 0) and their held-out records (part 1)")
    # the pool's shape: the default run's (synthetic.*) unless a run changed it, then the same values here
    ap.add_argument("--train-policies", type=int, default=d.train_policies,
                    help=f"policies the run trains on, `seen` (default {d.train_policies}: synthetic.train_policies)")
    ap.add_argument("--held-out-policies", type=int, default=d.held_out_policies,
                    help=f"policies it never sees, `held-out` (default {d.held_out_policies}: "
                         "synthetic.held_out_policies)")
    ap.add_argument("--prompts", type=int, default=d.prompts,
                    help=f"the pool's prompts (default {d.prompts}: synthetic.prompts)")
    ap.add_argument("--force", action="store_true", help="replace an existing output file")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    for flag, value, low in (("--lines", a.lines, 1), ("--candidates", a.candidates, 2), ("--seed", a.seed, 0),
                             ("--part", a.part, 0), ("--train-policies", a.train_policies, 2),
                             ("--held-out-policies", a.held_out_policies, 2), ("--prompts", a.prompts, 1)):
        if value < low:
            ap.error(f"{flag} {value}: must be >= {low}")
    out = Path(a.output)
    if out.is_dir():
        ap.error(f"--output {out}: is a directory")
    if out.exists() and not a.force:
        print(f"polar data synthetic: {out} exists; --force replaces it", file=sys.stderr)
        return 2
    try:
        lines = make_lines(a.kind, a.lines, a.seed, a.policies, a.wrapper, a.candidates, a.train_policies,
                           a.held_out_policies, a.prompts, a.part)
    except ValueError as e:
        print(f"polar data synthetic: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    with Replacement(out) as f:  # a reader never sees half a file, nor a crash of the machine an empty one
        f.file.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        f.commit()
    print(f"polar data synthetic: {len(lines)} {a.kind} lines ({a.policies or KINDS[a.kind]} policies, wrapper "
          f"{a.wrapper}, seed {a.seed}, part {a.part}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
