from types import SimpleNamespace

import pytest

from polar.baselines import (SCORERS, bigram_overlap, length_difference, pairwise_accuracy,
                             word_overlap, words)


def trip(reference, chosen, rejected):
    return SimpleNamespace(reference=reference, chosen=chosen, rejected=rejected)


def test_words_ignore_case_and_punctuation():
    assert words("The cat, the HAT!") == ["the", "cat", "the", "hat"]


def test_word_overlap_is_jaccard_of_word_sets():
    # {a, b, c} vs {b, c, d}: 2 shared of 4
    assert word_overlap("a b c", "B, c d c") == pytest.approx(0.5)
    assert word_overlap("a b", "c d") == 0.0
    assert word_overlap("x y", "Y x") == 1.0
    assert word_overlap("", "") == 1.0
    assert word_overlap("a", "") == 0.0


def test_bigram_overlap_is_jaccard_of_adjacent_pairs():
    # (a,b),(b,c) vs (a,b),(b,d): 1 shared of 3
    assert bigram_overlap("a b c", "a b d") == pytest.approx(1 / 3)
    # same words, no shared order
    assert bigram_overlap("a b c", "c b a") == 0.0
    assert word_overlap("a b c", "c b a") == 1.0
    assert bigram_overlap("single", "single") == 1.0  # no pairs on either side


def test_length_difference():
    assert length_difference("abcd", "ab") == -2.0
    assert length_difference("ab", "abcd") == -2.0
    assert length_difference("same", "SAME") == 0.0


def test_pairwise_accuracy_counts_ties_as_half():
    trips = [
        trip("a b c", "a b c", "x y z"),  # word overlap right
        trip("a b c", "x y z", "a b"),  # word overlap wrong
        trip("a b", "c d", "e f"),  # tie: 0 vs 0
        trip("a b", "a c", "b d"),  # tie: 1/3 vs 1/3
    ]
    assert pairwise_accuracy(word_overlap, trips) == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert pairwise_accuracy(length_difference, trips[:1]) == 0.5


def test_scorers_disagree_where_they_should():
    t = [trip("aaaa bbbb", "cccc dddd", "aaaa bbbb and more words")]
    assert pairwise_accuracy(length_difference, t) == 1.0
    assert pairwise_accuracy(word_overlap, t) == 0.0
    assert set(SCORERS) == {"word", "bigram", "length"}


def test_pairwise_accuracy_needs_data():
    with pytest.raises(ValueError):
        pairwise_accuracy(word_overlap, [])
