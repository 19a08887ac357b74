"""Random POLAR items for the serve tests: n rollouts per (prompt, reference), of varied lengths,
with empty outputs, non-ASCII text, message lists and both wrappers."""
import numpy as np

WORDS = ["alpha", "beta", "gamma", "delta", "état", "数据", "x", "reward", "policy", "—", "\n", "42"]


def text(rng, lo, hi):
    return " ".join(rng.choice(WORDS, rng.integers(lo, hi + 1)).tolist())


def make_items(seed: int, groups: int = 4, rollouts: int = 4, long: int = 40) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = []
    for g in range(groups):
        prompt = text(rng, 3, long)
        if g % 3 == 1:
            prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}]
        reference = text(rng, 1, long)
        if not reference.strip():  # "\n" alone: the servers refuse a blank reference
            reference = "reward"
        wrapper = "pretrain" if g % 4 == 3 else "sft"
        for k in range(rollouts):
            out = "" if k == 1 else text(rng, 1, long)
            items.append({"prompt": prompt, "reference": reference, "output": out, "wrapper": wrapper})
    order = rng.permutation(len(items))
    return [items[i] for i in order]
