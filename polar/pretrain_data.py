"""The embedded default's data: synthetic policies -> POLAR triplets -> encoded groups.

Seen policies give the training triplets and a fresh seen-policy evaluation set; held-out
policies, drawn from the same style distribution but never trained on, give the evaluation that
shows the model learned to discriminate policies rather than memorise them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.setting_checks import at_least, boolean, one_of, setting
from polar.format import EncodedGroup, encode_groups
from polar.synthetic import Triplet, make_pool, make_prompts, make_triplets
from polar.tokenizer import Tokenizer


@dataclass
class SyntheticDataConfig:
    seed: int = setting(0, at_least(0))
    train_policies: int = setting(160, at_least(2))
    held_out_policies: int = setting(40, at_least(2))
    train_triplets: int = setting(24000, at_least(1))
    eval_triplets: int = setting(1000, at_least(1))  # per evaluation set (held-out and seen)
    # also evaluate on fresh triplets of the training policies (memorisation vs discrimination);
    # false leaves the held-out set and the training data exactly as they are
    eval_seen: bool = setting(True, boolean)
    prompts: int = setting(5000, at_least(1))
    # the input template (polar/format.py): sft puts "\n" after each prompt, pretrain does not
    wrapper: str = setting("sft", one_of("sft", "pretrain"))


@dataclass
class SyntheticSplits:
    train: list
    eval_seen: list
    eval_held_out: list


def make_splits(cfg: SyntheticDataConfig) -> SyntheticSplits:
    if cfg.train_policies < 2 or cfg.held_out_policies < 2:
        raise ValueError("synthetic.train_policies and synthetic.held_out_policies must each be >= 2")
    pool = make_pool(cfg.seed, cfg.train_policies + cfg.held_out_policies)
    seen, held_out = pool[: cfg.train_policies], pool[cfg.train_policies:]
    prompts = make_prompts(cfg.seed, cfg.prompts)
    rng = np.random.default_rng([cfg.seed, 1])
    return SyntheticSplits(
        train=make_triplets(seen, prompts, rng, cfg.train_triplets),
        eval_seen=make_triplets(seen, prompts, rng, cfg.eval_triplets),
        eval_held_out=make_triplets(held_out, prompts, rng, cfg.eval_triplets),
    )


def encode_triplets(tokenizer: Tokenizer, triplets: list[Triplet], wrapper: str, max_length: int,
                    group_capacity: int = 0) -> list[tuple[EncodedGroup, np.ndarray]]:
    """Each triplet becomes one group of K=2 candidates, chosen (label 1) then rejected (label 0);
    `group_capacity` (the pack length) cuts a prompt further so that its group fits whole."""
    labels = np.array([1, 0], dtype=np.int8)
    groups = encode_groups(tokenizer, [t.prompt for t in triplets], [t.reference for t in triplets],
                           [[t.chosen, t.rejected] for t in triplets], wrapper=wrapper,
                           max_length=max_length, group_capacity=group_capacity)
    return [(g, labels) for g in groups]
