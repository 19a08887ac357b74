"""A built-in pool of synthetic text policies, for POLAR pre-training without any model or corpus.

POLAR learns to tell whether a candidate comes from the same policy as a reference (paper Eq. 7; its
pre-training data pairs policies drawn from a pool, App. D). Here a policy is a small stochastic
text generator with a style drawn at random from one style distribution, so policies held out of
training are new but of the same kind:

- its own alphabet habit: a lexicon of invented words built from syllables whose consonants and
  vowels follow a skewed, policy-specific distribution (visible in every byte);
- its own word frequencies (Zipf-like with a policy temperature) and a few favourite words;
- transition structure: words fall into classes and the class sequence is a Markov chain whose
  strength varies per policy;
- punctuation, casing and shouting habits, sentence-end mark, length distribution;
- repetition loops: a share of its texts fall into a copy loop that runs to the end of the text.

Continuations do not depend on the prompt: the prompt is context only (as for base LMs continuing
arbitrary text, the policy's habit dominates). Prompts are neutral (uniform letters). Everything is
numpy-vectorised over the texts of one policy; Python touches each text once (the final join):
20,000 triplets take about 1-2 s on one core. Deterministic given the seeds.

Difficulty, measured with a byte tokenizer (held-out policies, 40 of 200, 1000 triplets): the
default pool defeats the word-level baselines (word overlap ~0.72, word bigrams ~0.51, length
~0.70) but not a character-histogram cosine (~0.98): the style is plainly in the bytes, and a small
reward model trained from scratch learns to compare it within minutes (~0.72-0.76 after 11k
triplets; ~0.8 with an auxiliary next-token loss). `StyleConfig.transition_only()` leaves only
word-order differences and stays at chance over the same budget. Two-byte accented letters
(`EXTENDED_*`) made the task harder, not easier, so the default alphabet is ASCII.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

ASCII_CONSONANTS, ASCII_VOWELS = "bcdfghjklmnprstvwxz", "aeiouy"
# Extra letters, two UTF-8 bytes each; not the default (see the module docstring).
EXTENDED_CONSONANTS = ASCII_CONSONANTS + "çñšžčřłđþŋ"
EXTENDED_VOWELS = ASCII_VOWELS + "áéíóúàèìòùâêîôûäëïöüåøæ"
# Shared by every policy: they make texts read like text and give all pairs some word overlap.
FUNCTION_WORDS = np.array("the a of and to in is it that on for with as at by or".split(),
                          dtype=object)
SEPARATORS = np.array([" ", ", ", ". ", "; ", "! ", " - ", "? ", "... "], dtype=object)
SENTENCE_END = np.array([False, False, True, False, True, False, True, True])
END_MARKS = np.array([".", "!", "", "...", "?"], dtype=object)
_MAX_SYLLABLES = 3


@dataclass(frozen=True)
class StyleConfig:
    """The style distribution policies are drawn from. Ranges are (low, high), drawn uniformly."""

    consonants: str = ASCII_CONSONANTS
    vowels: str = ASCII_VOWELS
    letter_alpha: float = 0.25  # Dirichlet concentration of consonant/vowel weights; small = skewed
    shared_lexicon: bool = False  # True: every policy uses one lexicon and one word distribution
    lexicon_size: int = 800
    zipf_exponent: tuple = (0.4, 0.9)  # word-frequency skew before the temperature
    temperature: tuple = (0.7, 1.4)
    n_favourites: int = 4
    favourite_rate: tuple = (0.0, 0.12)  # share of words that are one of the favourites
    function_rate: tuple = (0.1, 0.3)  # share of words that are shared function words
    n_classes: int = 8
    transition_strength: tuple = (0.0, 0.6)  # 0: classes i.i.d.; 1: a deterministic class cycle
    separator_alpha: float = 0.5  # Dirichlet concentration over SEPARATORS (after a space bias)
    upper_rate: tuple = (0.0, 0.08)  # share of words written in capitals
    loop_prob: tuple = (0.0, 0.3)  # share of texts that fall into a copy loop
    words: tuple = (6, 18)  # range of the policy's mean number of words per text
    length_spread: float = 0.3  # per-text word count ~ mean * (1 +- spread)
    min_words: int = 5
    max_words: int = 32

    @classmethod
    def transition_only(cls) -> "StyleConfig":
        """Identical word frequencies for all policies; they differ only in class transitions."""
        return cls(shared_lexicon=True, zipf_exponent=(0.7, 0.7), temperature=(1.0, 1.0),
                   favourite_rate=(0.0, 0.0), function_rate=(0.0, 0.0),
                   transition_strength=(0.8, 0.8), separator_alpha=1e6, upper_rate=(0.0, 0.0),
                   loop_prob=(0.0, 0.0), words=(15, 15))


@dataclass
class Policy:
    """One synthetic policy; `sample` draws texts in its style."""

    id: int
    lexicon: np.ndarray  # object array of str, lowercase
    word_probs: np.ndarray  # over the lexicon, class-blind unigram weights
    word_class: np.ndarray  # int, class of each lexicon word
    class_trans: np.ndarray  # (C, C) row-stochastic, doubly stochastic (uniform class marginal)
    favourites: np.ndarray  # object array of str
    favourite_rate: float
    function_rate: float
    separator_probs: np.ndarray  # over SEPARATORS
    end_mark: str
    upper_rate: float
    loop_prob: float
    mean_words: float
    length_spread: float
    min_words: int
    max_words: int

    def sample(self, rng: np.random.Generator, n: int) -> list:
        """`n` texts of this policy."""
        if n <= 0:
            return []
        lens = np.clip(np.rint(self.mean_words * (1 + self.length_spread * rng.uniform(-1, 1, n))),
                       self.min_words, self.max_words).astype(np.int64)
        width = int(lens.max())
        words = self._words(rng, n, width)
        sep_idx = _categorical(rng, self.separator_probs, (n, width))
        words = self._case(rng, words, sep_idx)
        words, sep_idx = self._loops(rng, words, sep_idx, lens)
        seps = SEPARATORS[sep_idx]
        seps[np.arange(n), lens - 1] = self.end_mark
        inter = np.empty((n, 2 * width), dtype=object)
        inter[:, 0::2], inter[:, 1::2] = words, seps
        return ["".join(row[: 2 * k]) for row, k in zip(inter, lens.tolist())]

    def classes(self, rng, n, width):
        """Word-class sequences of the policy's Markov chain, shape (n, width)."""
        classes = np.empty((n, width), dtype=np.int64)
        n_cls = self.class_trans.shape[0]
        classes[:, 0] = rng.integers(0, n_cls, n)
        cum = np.cumsum(self.class_trans, axis=1)
        for t in range(1, width):  # a Markov chain is sequential in t, vectorised over texts
            u = rng.random((n, 1))
            classes[:, t] = np.minimum((u > cum[classes[:, t - 1]]).sum(axis=1), n_cls - 1)
        return classes

    def _words(self, rng, n, width):
        classes = self.classes(rng, n, width)
        n_cls = self.class_trans.shape[0]
        idx = np.empty((n, width), dtype=np.int64)
        for c in range(n_cls):
            members = np.flatnonzero(self.word_class == c)
            mask = classes == c
            p = self.word_probs[members] / self.word_probs[members].sum()
            idx[mask] = members[_categorical(rng, p, int(mask.sum()))]
        words = self.lexicon[idx]
        kind = rng.random((n, width))
        fav = kind < self.favourite_rate
        if len(self.favourites):
            words[fav] = self.favourites[rng.integers(0, len(self.favourites), int(fav.sum()))]
        func = (kind >= self.favourite_rate) & (kind < self.favourite_rate + self.function_rate)
        words[func] = FUNCTION_WORDS[rng.integers(0, len(FUNCTION_WORDS), int(func.sum()))]
        return words

    def _case(self, rng, words, sep_idx):
        n = words.shape[0]
        # Sentence case: the first word and every word after a sentence-ending separator.
        starts = np.concatenate([np.ones((n, 1), bool), SENTENCE_END[sep_idx][:, :-1]], axis=1)
        upper = rng.random(words.shape) < self.upper_rate
        out = words.copy()
        if starts.any():
            out[starts] = np.char.capitalize(words[starts].astype(str)).astype(object)
        if upper.any():
            out[upper] = np.char.upper(words[upper].astype(str)).astype(object)
        return out

    def _loops(self, rng, words, sep_idx, lens):
        n, width = words.shape
        looped = rng.random(n) < self.loop_prob
        if not looped.any():
            return words, sep_idx
        span = rng.integers(1, 4, n)
        start = np.floor(rng.random(n) * np.maximum(lens - span, 1)).astype(np.int64)
        t = np.arange(width)[None, :]
        s0, sp = start[:, None], span[:, None]
        # From start+span on, the text repeats its span forever (truncated at the text's length).
        src = np.where(looped[:, None] & (t >= s0 + sp), s0 + (t - s0) % sp, t)
        return np.take_along_axis(words, src, 1), np.take_along_axis(sep_idx, src, 1)


@dataclass
class Triplet:
    """One POLAR pre-training example: A wrote reference and chosen, B != A wrote rejected."""

    prompt: str
    reference: str
    chosen: str
    rejected: str
    policy_a: int
    policy_b: int


def _categorical(rng, p, size):
    cum = np.cumsum(p)
    cum /= cum[-1]
    return np.minimum(np.searchsorted(cum, rng.random(size), side="right"), len(p) - 1)


def _invent_words(rng, n, consonants, vowels, cons_w, vow_w):
    """`n` words of 1-3 consonant-vowel syllables (sometimes a closing consonant), vectorised."""
    cons, vows = np.array(list(consonants)), np.array(list(vowels))
    n_syl = rng.integers(1, _MAX_SYLLABLES + 1, n)
    width = 2 * _MAX_SYLLABLES + 1
    buf = np.zeros((n, width), dtype="<U1")
    for s in range(_MAX_SYLLABLES):
        on = n_syl > s
        buf[on, 2 * s] = cons[_categorical(rng, cons_w, int(on.sum()))]
        buf[on, 2 * s + 1] = vows[_categorical(rng, vow_w, int(on.sum()))]
    coda = rng.random(n) < 0.3
    buf[np.flatnonzero(coda), 2 * n_syl[coda]] = cons[_categorical(rng, cons_w, int(coda.sum()))]
    # A fixed-width string view drops trailing NULs, which turns each row into its word.
    return buf.view(f"<U{width}").ravel().astype(object)


def _doubly_stochastic(rng, n_cls, strength):
    # A mix of uniform and a random cyclic permutation: every class keeps marginal 1/C, so the
    # strength changes the transitions without changing word frequencies.
    perm = rng.permutation(n_cls)
    cycle = np.zeros((n_cls, n_cls))
    cycle[perm, np.roll(perm, -1)] = 1.0
    return (1 - strength) / n_cls + strength * cycle


def _lexicon(rng, style):
    cons_w = rng.dirichlet(np.full(len(style.consonants), style.letter_alpha))
    vow_w = rng.dirichlet(np.full(len(style.vowels), style.letter_alpha))
    letters = style.consonants, style.vowels, cons_w, vow_w
    return _invent_words(rng, style.lexicon_size, *letters), letters


def _word_probs(rng, style, size):
    ranks = rng.permutation(size) + 1.0
    expo = rng.uniform(*style.zipf_exponent) / rng.uniform(*style.temperature)
    return ranks ** -expo


def make_pool(seed: int, n_policies: int, style: Optional[StyleConfig] = None) -> list:
    """`n_policies` policies drawn i.i.d. from `style`; split the list for seen/held-out sets."""
    style = style or StyleConfig()
    rng = np.random.default_rng([seed, 0x504F4C])
    shared = None
    if style.shared_lexicon:
        lex, _ = _lexicon(rng, replace(style, letter_alpha=1e6))
        shared = (lex, _word_probs(rng, style, len(lex)),
                  rng.integers(0, style.n_classes, len(lex)))
    pool = []
    for i in range(n_policies):
        if shared is None:
            lex, letters = _lexicon(rng, style)
            probs = _word_probs(rng, style, len(lex))
            classes = rng.integers(0, style.n_classes, len(lex))
            favourites = _invent_words(rng, style.n_favourites, *letters)
        else:
            lex, probs, classes = shared
            favourites = np.array([], dtype=object)
        sep_w = rng.dirichlet(np.full(len(SEPARATORS), style.separator_alpha))
        sep_p = 0.6 * np.eye(len(SEPARATORS))[0] + 0.4 * sep_w  # mostly spaces, as text is
        strength = rng.uniform(*style.transition_strength)
        pool.append(Policy(
            id=i, lexicon=lex, word_probs=probs, word_class=classes,
            class_trans=_doubly_stochastic(rng, style.n_classes, strength),
            favourites=favourites, favourite_rate=rng.uniform(*style.favourite_rate),
            function_rate=rng.uniform(*style.function_rate), separator_probs=sep_p,
            end_mark="." if style.shared_lexicon else END_MARKS[rng.integers(0, len(END_MARKS))],
            upper_rate=rng.uniform(*style.upper_rate), loop_prob=rng.uniform(*style.loop_prob),
            mean_words=rng.uniform(*style.words), length_spread=style.length_spread,
            min_words=style.min_words, max_words=style.max_words))
    return pool


def make_prompts(seed: int, n: int, min_words: int = 3, max_words: int = 6) -> list:
    """Neutral prompts (uniform ASCII letters, no policy style), by default about 8-45 bytes.

    Short on purpose: the prompt appears twice in every input and carries no policy signal.
    """
    rng = np.random.default_rng([seed, 0x50524F])
    flat = np.ones(len(ASCII_CONSONANTS)), np.ones(len(ASCII_VOWELS))
    vocab = np.concatenate([_invent_words(rng, 500, ASCII_CONSONANTS, ASCII_VOWELS, *flat),
                            FUNCTION_WORDS])
    lens = rng.integers(min_words, max_words + 1, n)
    idx = rng.integers(0, len(vocab), (n, max_words))
    marks = np.array(["?", ":", "."], dtype=object)[rng.integers(0, 3, n)]
    return [" ".join(vocab[row[:k]]).capitalize() + m
            for row, k, m in zip(idx, lens.tolist(), marks)]


def make_triplets(policies: Sequence[Policy], prompts: Sequence[str], rng: np.random.Generator,
                  n: int) -> list:
    """`n` triplets: per triplet a prompt and two different policies A != B from `policies`."""
    if len(policies) < 2:
        raise ValueError("make_triplets needs at least two policies")
    if not prompts:
        raise ValueError("make_triplets needs at least one prompt")
    k = len(policies)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k  # uniform over the others, never A
    p_idx = rng.integers(0, len(prompts), n)
    # Texts are drawn per policy in one batch: slot 0/1 = reference/chosen of A, slot 2 = rejected.
    owner = np.stack([a, a, b], axis=1)
    texts = np.empty((n, 3), dtype=object)
    for j in np.unique(owner):
        where = np.flatnonzero(owner.ravel() == j)
        texts.ravel()[where] = np.array(policies[j].sample(rng, len(where)), dtype=object)
    return [Triplet(prompts[p], t[0], t[1], t[2], policies[i].id, policies[m].id)
            for p, t, i, m in zip(p_idx.tolist(), texts, a.tolist(), b.tolist())]
