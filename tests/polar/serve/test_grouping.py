import sys

import numpy as np
import pytest

from polar.serve.batcher import plan_forwards
from polar.serve.grouping import group_items


def _ids(*parts):
    return np.concatenate([np.asarray(p, dtype=np.int32) for p in parts])


def _check_partition(items, groups):
    seen = []
    for g in groups:
        for i, c in zip(g.items, g.candidates):
            assert len(c) >= 1
            np.testing.assert_array_equal(np.concatenate([g.prefix, c]), items[i])
            seen.append(i)
    assert sorted(seen) == list(range(len(items)))


def test_rollouts_of_one_prompt_share_their_prefix_and_other_prompts_do_not_merge():
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, 250, 300) for _ in range(3)]
    items = [_ids([256], p, rng.integers(0, 250, rng.integers(1, 40)), [259]) for p in prefixes for _ in range(8)]
    order = rng.permutation(len(items))  # requests interleave
    items = [items[i] for i in order]
    groups = group_items(items, row_tokens=4096)
    _check_partition(items, groups)
    assert len(groups) == 3
    assert all(len(g.prefix) >= 301 for g in groups)
    assert sum(len(g) for g in groups) == sum(len(a) for a in items) - 3 * 7 * sum(len(g.prefix) for g in groups) // 3


def test_identical_items_keep_their_last_token_and_singletons_stand_alone():
    a = _ids([256, 5, 6, 7, 259])
    items = [a, a.copy(), _ids([256, 9, 259]), _ids([1])]
    groups = group_items(items, row_tokens=100, min_prefix=1)
    _check_partition(items, groups)
    pair = [g for g in groups if len(g.items) == 2]
    assert len(pair) == 1 and len(pair[0].prefix) == 4


def test_row_budget_bounds_a_group():
    base = list(range(100))
    items = [_ids([256], base, [k, 259]) for k in range(40)]
    groups = group_items(items, row_tokens=150)  # 101 shared + 2 each: all 40 would need 181 tokens
    _check_partition(items, groups)
    assert all(len(g) <= 150 for g in groups if len(g.items) > 1)
    assert len(groups) >= 2


def test_items_sharing_less_than_min_prefix_stay_apart():
    items = [_ids([256], [k] * 10, [259]) for k in range(5)] + [_ids([256], [1] * 40, [k, 259]) for k in range(3)]
    groups = group_items(items, row_tokens=1000, min_prefix=32)
    _check_partition(items, groups)
    assert sorted(len(g.items) for g in groups) == [1, 1, 1, 1, 1, 3]  # the 5 short ones share 11 tokens at most


def test_empty_item_is_refused():
    with pytest.raises(ValueError, match="item 1 has no tokens"):
        group_items([_ids([1, 2]), _ids([])], 10)


def test_forwards_respect_the_token_budget():
    rng = np.random.default_rng(1)
    items = [rng.integers(0, 250, rng.integers(5, 200)).astype(np.int32) for _ in range(60)]
    groups = group_items(items, row_tokens=256)
    forwards = plan_forwards(groups, row_tokens=256, max_batch_tokens=1024)
    flat = [g for rows in forwards for r in rows for g in r]
    assert sorted(id(g) for g in flat) == sorted(id(g) for g in groups)
    for rows in forwards:
        width = max(sum(len(g) for g in r) for r in rows)
        assert len(rows) == 1 or len(rows) * width <= 1024


def _plain_partition(items, row_tokens, window=256, min_prefix=32):
    """The dynamic program written as the plain loop over (i, j): the reference for group_items."""
    n = len(items)
    order = sorted(range(n), key=lambda i: items[i].astype(">u4").tobytes())
    seq = [items[i] for i in order]
    lcp = [0] + [next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                 for a, b in zip(seq, seq[1:])]
    best, start = [0] * (n + 1), [0] * (n + 1)
    for i in range(1, n + 1):
        best[i], start[i] = best[i - 1], i - 1
        shared, total = len(seq[i - 1]) - 1, len(seq[i - 1])
        for j in range(i - 2, max(-1, i - 1 - window), -1):
            shared = min(shared, lcp[j + 1], len(seq[j]) - 1)
            if shared < max(min_prefix, 1):
                break
            total += len(seq[j])
            if total - (i - j - 1) * shared > row_tokens:
                break
            if best[j] + (i - j - 1) * shared > best[i]:
                best[i], start[i] = best[j] + (i - j - 1) * shared, j
    out, i = [], n
    while i > 0:
        out.append(sorted(order[start[i]:i]))
        i = start[i]
    return sorted(out)


def test_the_partition_is_the_plain_dynamic_programs():
    rng = np.random.default_rng(5)
    for _ in range(150):
        prefixes = [rng.integers(1, 6, int(rng.integers(1, 120))) for _ in range(int(rng.integers(1, 5)))]
        items = []
        for _ in range(int(rng.integers(1, 60))):
            p = prefixes[int(rng.integers(len(prefixes)))]
            items.append(_ids([1], p[:int(rng.integers(0, len(p) + 1))], rng.integers(1, 4, int(rng.integers(0, 30)))))
            if rng.random() < 0.2:
                items.append(items[int(rng.integers(len(items)))].copy())
        kw = dict(row_tokens=int(rng.choice([16, 64, 200, 4096])), window=int(rng.choice([2, 3, 8, 256])),
                  min_prefix=int(rng.choice([0, 1, 4, 32])))
        groups = group_items(items, **kw)
        _check_partition(items, groups)
        assert sorted(sorted(g.items) for g in groups) == _plain_partition(items, **kw)


def _interpreted_lines(fn, module):
    """fn()'s result and how many lines of `module` the interpreter stepped through for it."""
    count = [0]

    def local(frame, event, arg):
        count[0] += event == "line"
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename == module.__file__ else None)
    try:
        return fn(), count[0]
    finally:
        sys.settrace(None)


def test_thousands_of_rollouts_of_one_prompt_take_a_few_interpreter_steps_each():
    """Counted, not timed (the time is benchmarks/serve_grouping.py's): a loop over the window's
    (i, j) in Python stepped through thousands of lines per item, 4-5 s for these 4,096 rollouts;
    numpy over each window leaves a few dozen."""
    from polar.serve import grouping

    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 250, 40)
    items = [_ids([1], prompt, rng.integers(3, 250, 8)) for _ in range(4096)]
    groups, lines = _interpreted_lines(lambda: group_items(items, row_tokens=4096), grouping)
    _check_partition(items, groups)
    assert len(groups) == 16  # 4096 / the window of 256
    assert lines < 64 * len(items), lines / len(items)
