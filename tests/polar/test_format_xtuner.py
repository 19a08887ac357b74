"""polar.format's truncation against the rule of the code that trained the released POLAR models: xtuner's
`tokenize_ref` (InternLM/xtuner, xtuner/dataset/preference_dataset.py), re-stated here from its text on the
byte tokenizer, where a token is a byte and the ids can be written down directly.

tokenize_ref tokenizes each piece with add_special_tokens=True, so every length it compares counts the BOS
the tokenizer puts first: a response keeps ids[:max_response] (its BOS and max_response - 1 text tokens), the
prompt budget is min over chosen and rejected of (max_length - 4 - len(reference ids) - len(candidate ids)) // 2,
and a longer prompt keeps ids[-budget:] (the BOS falls off the front). The kept ids are decoded without
special tokens, "\\n" is written after the prompt only before a non-empty response (sft), and the whole
string is tokenized again with its BOS; the reward token id is appended. ASCII texts without special-token
literals keep the comparison to the lengths: polar.format's documented departures (literals stay text, a cut
never splits a character) do not arise."""
import numpy as np
import pytest

from polar.format import encode_group, encode_groups
from polar.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BOS, SEP, REW = TOK.bos_id, TOK.reward_sep_id, TOK.reward_token_id


def tokenize_ref_ids(prompt, reference, candidates, wrapper, max_length, max_response):
    """Each candidate's ids by tokenize_ref's rule (K candidates: the budget's min runs over all of them;
    tokenize_ref's own pair is K = 2), and whether the prompt budget was <= 0."""
    def encode(text):  # tokenizer.encode(text, add_special_tokens=True) on bytes
        return [BOS] + list(text.encode())

    def decode(ids):  # skip_special_tokens=True
        return bytes(i for i in ids if i < 256).decode()

    room = max_length - 4  # <|reward|>, two "\n", the reward token
    p = encode(prompt)
    r = encode(reference)
    cs = [encode(c) for c in candidates]
    if len(r) > max_response:
        r = r[:max_response]
    cs = [c[:max_response] if len(c) > max_response else c for c in cs]
    budget = min((room - len(r) - len(c)) // 2 for c in cs)
    if budget <= 0:
        # Unguarded in tokenize_ref (p[-0:] keeps the whole prompt, a negative budget drops that many ids
        # from its start); polar.format keeps no prompt.
        p = []
    elif len(p) > budget:
        p = p[-budget:]
    p_text, r_text = decode(p), decode(r)

    def side(response):
        return p_text + response if wrapper == "pretrain" or response == "" else p_text + "\n" + response

    head = [BOS] + list(side(r_text).encode()) + [SEP]
    return [head + list(side(decode(c)).encode()) + [REW] for c in cs], budget <= 0


def random_ascii(rng, longest):
    chars = list("abcdefghij0123456789 \n")
    return "".join(rng.choice(chars, size=int(rng.integers(0, longest + 1))))


@pytest.mark.parametrize("wrapper", ["sft", "pretrain"])
def test_truncation_counts_bos_as_tokenize_ref_does(wrapper):
    rng = np.random.default_rng(7 if wrapper == "sft" else 8)
    records = [(random_ascii(rng, 24), random_ascii(rng, 14),
                [random_ascii(rng, 14) for _ in range(int(rng.integers(1, 4)))],
                int(rng.integers(0, 48)), int(rng.integers(0, 14))) for _ in range(3000)]
    lengths = sorted({(m, r) for *_, m, r in records})
    mismatched, guarded, cut = [], 0, 0
    for max_length, max_response in lengths:  # one batch per length pair, as a data build encodes
        batch = [x for x in records if x[3:] == (max_length, max_response)]
        groups = encode_groups(TOK, [x[0] for x in batch], [x[1] for x in batch], [x[2] for x in batch],
                               wrapper, max_length=max_length, max_response=max_response)
        for (p, r, cs, _, _), g in zip(batch, groups):
            want, unguarded = tokenize_ref_ids(p, r, cs, wrapper, max_length, max_response)
            got = [g.full(i).tolist() for i in range(len(cs))]
            guarded += unguarded
            cut += g.prompt_cut or g.responses_cut > 0
            if got != want:
                mismatched.append((p, r, cs, max_length, max_response))
    assert mismatched == [], f"{len(mismatched)} of {len(records)} differ from tokenize_ref, e.g. {mismatched[:3]}"
    # the sample reaches the cuts and the guard, not only records that fit whole
    assert cut > len(records) // 2 and guarded > 100


def test_the_audited_example():
    """max_length 20, max_response 5: the reference keeps its BOS and 4 bytes, the prompt budget is
    (16 - 5 - 4) // 2 = 3; 18 ids in all, where BOS outside the count gave 21."""
    g = encode_group(TOK, "0123456789", "abcdefgh", ["xyz"], max_length=20, max_response=5)
    assert TOK.decode(g.full(0)) == "789\nabcd<|reward|>789\nxyz[UNUSED_TOKEN_130]"
    assert len(g.full(0)) == 18


def test_long_records_at_the_default_lengths():
    rng = np.random.default_rng(11)
    for _ in range(12):
        p, r = random_ascii(rng, 30000), random_ascii(rng, 6000)
        cs = [random_ascii(rng, 6000), random_ascii(rng, 6000)]
        g = encode_group(TOK, p, r, cs)
        want, _ = tokenize_ref_ids(p, r, cs, "sft", 16384, 4096)
        assert [g.full(i).tolist() for i in range(2)] == want
        assert max(len(w) for w in want) <= 16384 - 1
