import re
from dataclasses import replace

import numpy as np
import pytest

from polar.synthetic import (EXTENDED_CONSONANTS, EXTENDED_VOWELS, FUNCTION_WORDS, StyleConfig,
                             Triplet, make_pool, make_prompts, make_triplets)


@pytest.fixture(scope="module")
def pool():
    return make_pool(7, 12)


def vocabulary(policy):
    return set(policy.lexicon) | set(policy.favourites) | set(FUNCTION_WORDS)


def word_set(text):
    return set(re.findall(r"\w+", text.lower()))


def test_pool_is_deterministic_and_seed_dependent(pool):
    again = make_pool(7, 12)
    other = make_pool(8, 12)
    for p, q in zip(pool, again):
        assert p.sample(np.random.default_rng(1), 5) == q.sample(np.random.default_rng(1), 5)
    rng = np.random.default_rng
    assert pool[0].sample(rng(1), 5) != other[0].sample(rng(1), 5)
    assert [p.id for p in pool] == list(range(12))


def test_policies_write_only_their_own_words(pool):
    rng = np.random.default_rng(0)
    for p in pool:
        for text in p.sample(rng, 20):
            assert word_set(text) <= vocabulary(p)


def test_policies_have_distinct_letter_habits(pool):
    # The style must be visible in the bytes: letter histograms of two policies differ far more
    # than those of two samples of one policy.
    rng = np.random.default_rng(0)

    letters = sorted(set(EXTENDED_CONSONANTS + EXTENDED_VOWELS))

    def hist(p):
        text = "".join(p.sample(rng, 200)).lower()
        h = np.array([text.count(c) for c in letters], dtype=float)
        return h / h.sum()

    same = np.abs(hist(pool[0]) - hist(pool[0])).sum()
    diff = np.mean([np.abs(hist(pool[0]) - hist(q)).sum() for q in pool[1:]])
    assert diff > 4 * same


def test_sample_lengths_follow_the_style(pool):
    style = StyleConfig()
    rng = np.random.default_rng(0)
    for p in pool:
        for text in p.sample(rng, 30):
            n = len(re.findall(r"\w+", text))
            assert style.min_words <= n <= style.max_words
    assert pool[0].sample(rng, 0) == []


def test_copy_loops_repeat_a_span_to_the_end(pool):
    base = replace(pool[0], upper_rate=0.0, min_words=20, max_words=20, mean_words=20.0)
    plain = base.sample(np.random.default_rng(3), 50)
    looped = replace(base, loop_prob=1.0).sample(np.random.default_rng(3), 50)
    for x, y in zip(plain, looped):
        x, y = re.findall(r"\w+", x.lower()), re.findall(r"\w+", y.lower())
        assert len(x) == len(y) == 20

        def is_loop(s, k):  # y copies x up to s+k, then repeats its span y[s:s+k] to the end
            return y[:s + k] == x[:s + k] and all(y[t] == y[s + (t - s) % k] for t in range(s, 20))
        assert any(is_loop(s, k) for k in (1, 2, 3) for s in range(20 - k))
    assert plain != looped


def test_transition_only_pool_shares_word_frequencies():
    pool = make_pool(1, 4, StyleConfig.transition_only())
    for p in pool[1:]:
        assert p.lexicon is pool[0].lexicon
        np.testing.assert_array_equal(p.word_probs, pool[0].word_probs)
    for p in pool:
        np.testing.assert_allclose(p.class_trans.sum(axis=0), 1.0)
        np.testing.assert_allclose(p.class_trans.sum(axis=1), 1.0)
    assert not np.allclose(pool[0].class_trans, pool[1].class_trans)


def test_transitions_shape_the_class_sequence():
    p = make_pool(2, 1, StyleConfig.transition_only())[0]
    cls = p.classes(np.random.default_rng(0), 400, 15)
    succ = p.class_trans.argmax(axis=1)
    # Strength 0.8 on a cycle: the favoured successor follows 0.8 + 0.2 / 8 of the time.
    assert abs(np.mean(cls[:, 1:] == succ[cls[:, :-1]]) - 0.825) < 0.03
    # The chain keeps the uniform class marginal, so word frequencies stay those of the pool.
    np.testing.assert_allclose(np.bincount(cls.ravel(), minlength=8) / cls.size, 1 / 8, atol=0.01)


def test_prompts():
    prompts = make_prompts(3, 200)
    assert prompts == make_prompts(3, 200)
    assert prompts != make_prompts(4, 200)
    lengths = [len(p.encode()) for p in prompts]
    assert min(lengths) >= 8 and max(lengths) <= 50
    assert all(p[-1] in "?:." for p in prompts)
    assert all(p.isascii() for p in prompts)  # neutral: none of the policies' extra habits
    longer = make_prompts(3, 50, min_words=10, max_words=12)
    assert min(len(p.split()) for p in longer) == 10


def test_triplets_follow_polar(pool):
    prompts = make_prompts(0, 50)
    subset = pool[4:]  # ids in triplets are the policies' own ids, not list positions
    trips = make_triplets(subset, prompts, np.random.default_rng(5), 300)
    assert len(trips) == 300 and all(isinstance(t, Triplet) for t in trips)
    by_id = {p.id: p for p in subset}
    for t in trips:
        assert t.policy_a != t.policy_b
        assert t.policy_a in by_id and t.policy_b in by_id
        assert t.prompt in prompts
        assert word_set(t.reference) <= vocabulary(by_id[t.policy_a])
        assert word_set(t.chosen) <= vocabulary(by_id[t.policy_a])
        assert word_set(t.rejected) <= vocabulary(by_id[t.policy_b])
    assert len({t.policy_a for t in trips}) == len(subset)
    assert len({t.policy_b for t in trips}) == len(subset)


def test_triplets_are_deterministic(pool):
    prompts = make_prompts(0, 50)
    a = make_triplets(pool, prompts, np.random.default_rng(9), 40)
    b = make_triplets(pool, prompts, np.random.default_rng(9), 40)
    assert a == b


def test_triplet_errors(pool):
    with pytest.raises(ValueError, match="two policies"):
        make_triplets(pool[:1], ["p"], np.random.default_rng(0), 3)
    with pytest.raises(ValueError, match="prompt"):
        make_triplets(pool, [], np.random.default_rng(0), 3)
