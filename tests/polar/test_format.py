"""polar.format with the byte tokenizer: the hand-worked inputs of the paper's format, truncation, cuts near
multi-byte characters, empty responses, groups and their capacity, and the embedded default's data
(tests/polar/test_format_hf.py runs the same rules through real Hugging Face tokenizers)."""
import numpy as np
import pytest

from polar.format import as_text, build_text, encode_group, encode_groups, prompt_budget
from polar.tokenizer import REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, ByteTokenizer

from .test_tokenizer import WORDS

TOK = ByteTokenizer()
BOS, SEP, REW = TOK.bos_id, TOK.reward_sep_id, TOK.reward_token_id


def b(text):
    return list(text.encode())


def full_ids(prompt, reference, candidate, wrapper="sft", tok=TOK):
    """The serving route: literal string, tokenized whole as a server does, BOS prepended."""
    text = build_text(prompt, reference, candidate, wrapper, reward_sep=tok.reward_sep_text,
                      reward_token=tok.reward_token_text)
    return tok.encode_served(text).tolist()


def common_prefix(seqs):
    n = min(len(s) for s in seqs)
    for i in range(n):
        if len({s[i] for s in seqs}) > 1:
            return i
    return n


def check_split(g, fulls):
    """The group's ids are the candidates' full inputs, split at their longest common prefix,
    leaving each candidate at least its reward token."""
    assert [g.full(i).tolist() for i in range(len(fulls))] == fulls
    assert len(g.prefix) == min(common_prefix(fulls), min(len(f) for f in fulls) - 1)
    assert all(len(c) >= 1 and c[-1] == fulls[0][-1] for c in g.candidates)
    assert g.prefix.dtype == np.int32 and all(c.dtype == np.int32 for c in g.candidates)


# --- hand-worked, byte tokenizer -----------------------------------------------------------------

def test_sft_hand_worked():
    assert build_text("Hi", "AB", "C") == "Hi\nAB<|reward|>Hi\nC[UNUSED_TOKEN_130]"
    g = encode_group(TOK, "Hi", "AB", ["C", "D"])
    assert g.prefix.dtype == np.int32 and g.candidates[0].dtype == np.int32
    assert g.prefix.tolist() == [BOS] + b("Hi\nAB") + [SEP] + b("Hi\n")
    assert [c.tolist() for c in g.candidates] == [b("C") + [REW], b("D") + [REW]]


def test_pretrain_hand_worked():
    assert build_text("Hi", "AB", "C", "pretrain") == "HiAB<|reward|>HiC[UNUSED_TOKEN_130]"
    g = encode_group(TOK, "Hi", "AB", ["C", "D"], wrapper="pretrain")
    assert g.prefix.tolist() == [BOS] + b("HiAB") + [SEP] + b("Hi")
    assert [c.tolist() for c in g.candidates] == [b("C") + [REW], b("D") + [REW]]


def test_prefix_takes_in_the_candidates_common_start():
    g = encode_group(TOK, "Hi", "AB", ["Cat", "Cow", "Cab"])
    assert g.prefix.tolist() == [BOS] + b("Hi\nAB") + [SEP] + b("Hi\nC")
    assert [c.tolist() for c in g.candidates] == [b("at") + [REW], b("ow") + [REW], b("ab") + [REW]]


def test_a_candidate_that_starts_another():
    g = encode_group(TOK, "p", "r", ["ab", "abc"])
    assert g.prefix.tolist() == [BOS] + b("p\nr") + [SEP] + b("p\nab")
    assert [c.tolist() for c in g.candidates] == [[REW], b("c") + [REW]]


def test_identical_candidates_each_keep_their_reward_token():
    g = encode_group(TOK, "p", "r", ["same", "same"])
    assert g.prefix.tolist() == [BOS] + b("p\nr") + [SEP] + b("p\nsame")
    assert [c.tolist() for c in g.candidates] == [[REW], [REW]]


def test_single_candidate_keeps_only_its_reward_token():
    g = encode_group(TOK, "Hi", "AB", ["C"])
    assert g.prefix.tolist() == [BOS] + b("Hi\nAB") + [SEP] + b("Hi\nC")
    assert [c.tolist() for c in g.candidates] == [[REW]]


def test_message_lists_join_contents_and_drop_roles():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    assert as_text(msgs) == "be brief\n2+2?\n4\nand 3+3?"
    ref = [{"role": "assistant", "content": "six"}]
    g = encode_group(TOK, msgs, ref, [[{"role": "assistant", "content": "6"}], "plain"])
    assert g.full(0).tolist() == ([BOS] + b("be brief\n2+2?\n4\nand 3+3?\nsix") + [SEP]
                                  + b("be brief\n2+2?\n4\nand 3+3?\n6") + [REW])
    assert g.full(1).tolist() == full_ids(msgs, ref, "plain")


def test_multi_turn_prompt_keeps_the_tail_of_the_joined_turns():
    msgs = [{"role": "user", "content": "first turn"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "last"}]
    # budget (22 - 4 - 2 - 2) // 2 = 7 bytes of "first turn\nok\nlast": "ok\nlast" (each response
    # counted with its BOS, as the training code counts it)
    g = encode_group(TOK, msgs, "r", ["c"], max_length=22)
    assert g.full(0).tolist() == [BOS] + b("ok\nlast\nr") + [SEP] + b("ok\nlast\nc") + [REW]


def test_bad_messages_and_arguments():
    with pytest.raises(TypeError, match="content"):
        as_text([{"role": "user"}])
    with pytest.raises(TypeError, match="content"):
        as_text(["plain strings are not messages"])
    with pytest.raises(TypeError):
        as_text(3)
    with pytest.raises(ValueError, match="wrapper"):
        encode_group(TOK, "p", "r", ["c"], wrapper="chat")
    with pytest.raises(ValueError, match="wrapper"):
        build_text("p", "r", "c", wrapper="chat")
    with pytest.raises(TypeError, match="candidates must be a list"):
        encode_group(TOK, "p", "r", "c")
    with pytest.raises(ValueError, match="at least one"):
        encode_group(TOK, "p", "r", [])
    with pytest.raises(TypeError, match="group 0: candidate 1: message 0"):
        encode_group(TOK, "p", "r", ["c", [{"role": "user"}]])
    with pytest.raises(ValueError, match="max_response"):
        encode_group(TOK, "p", "r", ["c"], max_response=-1)
    with pytest.raises(ValueError, match="max_length"):
        encode_group(TOK, "p", "r", ["c"], max_length=1.5)


def test_encode_groups_checks_its_lists():
    with pytest.raises(ValueError, match="must match"):
        encode_groups(TOK, ["p", "q"], ["r"], [["c"], ["d"]])
    with pytest.raises(ValueError, match="wrappers"):
        encode_groups(TOK, ["p"], ["r"], [["c"]], wrapper=["sft", "sft"])
    with pytest.raises(ValueError, match="wrapper"):
        encode_groups(TOK, ["p"], ["r"], [["c"]], wrapper=["chat"])
    with pytest.raises(TypeError, match="group 1: candidates"):
        encode_groups(TOK, ["p", "q"], ["r", "s"], [["c"], "d"])
    assert encode_groups(TOK, [], [], []) == []


@pytest.mark.parametrize("wrapper", ["sft", "pretrain"])
@pytest.mark.parametrize("prompt,reference,candidate", [
    ("Question?", "An answer.", "Another answer."),
    ("多字节 prompt ✓", "réponse — ok", "😀 emoji"),
    ("p", "", "c"),
    ("p", "r", ""),
    ("", "r", "c"),
    ("", "", ""),
])
def test_serving_string_gives_the_training_ids(wrapper, prompt, reference, candidate):
    g = encode_group(TOK, prompt, reference, [candidate], wrapper=wrapper)
    assert g.full(0).tolist() == full_ids(prompt, reference, candidate, wrapper)


# --- truncation ----------------------------------------------------------------------------------

def test_truncation_budgets_exactly():
    # Every length counts the piece's BOS, as the training code's add_special_tokens=True does:
    # reference BOS + 8 -> its first 5 ids, BOS + "abcd"; candidate BOS + 3 = 4; prompt budget
    # (20 - 4 - 5 - 4) // 2 = 3 (tail). xtuner's tokenize_ref gives exactly these 18 ids.
    g = encode_group(TOK, "0123456789", "abcdefgh", ["xyz"], max_length=20, max_response=5)
    assert g.full(0).tolist() == [BOS] + b("789\nabcd") + [SEP] + b("789\nxyz") + [REW]
    assert len(g.full(0)) == 18


def test_what_the_rule_cut_is_reported_per_group():
    """The responses cut to their head and whether the prompt lost its head, for a builder's report (a
    model never sees the end of a response cut to its first max_response tokens)."""
    groups = encode_groups(TOK, ["0123456789", "01", "012"], ["abcdefgh", "ab", "abcd"],
                           [["xyz", "uvwxyz"], ["x"], ["xyzu", "xyzuv"]], max_length=20, max_response=5)
    assert [(g.responses_cut, g.prompt_cut) for g in groups] == [(2, True), (0, False), (1, False)]
    assert [g.prompt_cut_to_fit for g in groups] == [0, 0, 0]
    # 4 bytes and a BOS fill max_response 5: "abcd" and "xyzu" are whole, "xyzuv" loses its "v".
    # "012": budget (20 - 4 - 5 - 5) // 2 = 3 holds it exactly; one byte more is cut
    assert encode_group(TOK, "0123", "abcd", ["xyzu"], max_length=20, max_response=5).prompt_cut


def test_odd_budget_rounds_down():
    assert prompt_budget(21, 5, 3) == 4
    assert prompt_budget(16384, 4096, 4096) == 4094
    assert prompt_budget(10, 5, 5) == 0


def test_budget_exhausted_drops_the_prompt():
    # budget (10 - 4 - 5 - 4) // 2 < 0: the training code's ids[-budget:] is unguarded (it would
    # keep the prompt less its first ids); here the prompt is dropped
    g = encode_group(TOK, "long prompt", "abcdefgh", ["xyz"], max_length=10, max_response=5)
    assert g.full(0).tolist() == [BOS] + b("\nabcd") + [SEP] + b("\nxyz") + [REW]
    # a budget of exactly 0 (ids[-0:] there keeps the whole prompt) drops it too
    g = encode_group(TOK, "long prompt", "abcd", ["xyz"], max_length=13, max_response=5)
    assert g.full(0).tolist() == [BOS] + b("\nabcd") + [SEP] + b("\nxyz") + [REW]


def test_candidate_head_is_kept():
    g = encode_group(TOK, "p", "r", ["0123456789", "0124"], max_response=5)  # BOS + 4 bytes
    assert g.prefix.tolist() == [BOS] + b("p\nr") + [SEP] + b("p\n012")
    assert [c.tolist() for c in g.candidates] == [b("3") + [REW], b("4") + [REW]]


def test_defaults_match_polar():
    ref, cand = "r" * 5000, "c" * 5000
    prompt = "p" * 20000
    g = encode_group(TOK, prompt, ref, [cand, "d" * 4096])
    # each response keeps its first 4096 ids, BOS and 4095 bytes; the budget counts the 4096
    n_prompt = (16384 - 4 - 4096 - 4096) // 2
    for i in range(2):
        assert len(g.full(i)) == 1 + 2 * n_prompt + 4095 + 4095 + 4 == 16384 - 1


def test_max_response_zero_empties_the_responses():
    g = encode_group(TOK, "p", "ref", ["cand"], max_response=0)
    assert g.full(0).tolist() == [BOS] + b("p") + [SEP] + b("p") + [REW]


# --- unicode near cut points: byte tokens never split a character ---------------------------------

def test_prompt_tail_cut_inside_a_character_drops_it():
    # budget (16 - 4 - 2 - 2) // 2 = 4 bytes; the last 4 of "日本" (3 + 3 bytes) start inside 日
    g = encode_group(TOK, "日本", "r", ["c"], max_length=16)
    assert g.full(0).tolist() == [BOS] + b("本\nr") + [SEP] + b("本\nc") + [REW]
    # one byte more of budget reaches a character boundary: both characters are kept
    g = encode_group(TOK, "日本", "r", ["c"], max_length=20)
    assert g.full(0).tolist() == [BOS] + b("日本\nr") + [SEP] + b("日本\nc") + [REW]


def test_response_head_cut_inside_a_character_drops_it_and_frees_budget():
    # reference "aé😀": 1 + 2 + 4 bytes; BOS + 4 bytes end inside 😀 -> "aé" (3 bytes) is kept and
    # the prompt budget counts those 3 and the BOS: (21 - 4 - 4 - 3) // 2 = 5 (4 with the limit's 5)
    g = encode_group(TOK, "0123456789", "aé😀", ["xy"], max_length=21, max_response=5)
    assert g.full(0).tolist() == [BOS] + b("56789\naé") + [SEP] + b("56789\nxy") + [REW]
    # a candidate whose first character is longer than max_response - 1 keeps nothing, and no "\n"
    g = encode_group(TOK, "p", "r", ["😀!", "ok"], max_response=3)
    assert g.full(0).tolist() == [BOS] + b("p\nr") + [SEP] + b("p") + [REW]
    assert g.full(1).tolist() == [BOS] + b("p\nr") + [SEP] + b("p\nok") + [REW]


def parse(text):
    """(prompt, reference, candidate) of a decoded sft input whose prompt has no "\n"."""
    head, tail = text[:-len(REWARD_TOKEN_TEXT)].split(REWARD_SEP_TEXT)
    p1, _, r = head.partition("\n")
    p2, _, c = tail.partition("\n")
    assert p1 == p2
    return p1, r, c


@pytest.mark.parametrize("max_response", range(0, 12))
@pytest.mark.parametrize("max_length", [8, 13, 21, 30])
def test_cuts_keep_whole_characters_within_the_budgets(max_response, max_length):
    prompt, ref, cands = "añ日😀b本", "é😀x日", ["😀日é", "zé"]
    g = encode_group(TOK, prompt, ref, cands, max_length=max_length, max_response=max_response)
    texts = [TOK.decode(g.full(i)) for i in range(2)]
    assert all("\ufffd" not in t for t in texts)  # no character was cut
    (p_kept, r_kept, c0), (_, _, c1) = parse(texts[0]), parse(texts[1])
    assert prompt.endswith(p_kept) and ref.startswith(r_kept)
    limit = max(0, max_response - 1)  # a response's first max_response ids hold its BOS
    for full, kept in [(ref, r_kept), (cands[0], c0), (cands[1], c1)]:
        assert full.startswith(kept) and len(kept.encode()) <= limit
        # the longest head of whole characters within the limit
        assert kept == full or len(full[:len(kept) + 1].encode()) > limit

    def counted(kept):  # the bytes a response kept and its BOS, within max_response
        return min(1 + len(kept.encode()), max_response)

    budget = prompt_budget(max_length, counted(r_kept), max(counted(c0), counted(c1)))
    assert len(p_kept.encode()) <= budget
    assert p_kept == prompt or len(prompt[-len(p_kept) - 1:].encode()) > budget
    # BOS and reward token included, within max_length - 1 whenever the responses leave room for
    # the reserved 4
    if max_length >= 4 + counted(r_kept) + max(counted(c0), counted(c1)):
        assert max(len(g.full(0)), len(g.full(1))) <= max_length - 1


# --- empty responses follow the training code ------------------------------------------------------

def test_empty_candidate_follows_the_training_code():
    g = encode_group(TOK, "p", "r", [""])
    assert g.full(0).tolist() == [BOS] + b("p\nr") + [SEP] + b("p") + [REW]


def test_empty_reference_drops_its_newline():
    g = encode_group(TOK, "p", "", ["c"])
    assert g.full(0).tolist() == [BOS] + b("p") + [SEP] + b("p\nc") + [REW]


def test_group_with_an_empty_candidate():
    g = encode_group(TOK, "p", "r", ["", "c"])
    assert g.prefix.tolist() == [BOS] + b("p\nr") + [SEP] + b("p")
    assert [c.tolist() for c in g.candidates] == [[REW], b("\nc") + [REW]]
    for i, cand in enumerate(["", "c"]):
        assert g.full(i).tolist() == full_ids("p", "r", cand)


def test_pretrain_group_with_empty_candidate():
    g = encode_group(TOK, "p", "r", ["", "c"], wrapper="pretrain")
    assert g.prefix.tolist() == [BOS] + b("pr") + [SEP] + b("p")
    assert [c.tolist() for c in g.candidates] == [[REW], b("c") + [REW]]


# --- groups ---------------------------------------------------------------------------------------

def test_group_budgets_the_prompt_with_the_longest_candidate():
    g = encode_group(TOK, "0123456789", "ab", ["x", "wxyz"], max_length=18)
    # budget (18 - 4 - 3 - 5) // 2 = 3, for both candidates (the training code's min over both)
    assert g.full(0).tolist() == [BOS] + b("789\nab") + [SEP] + b("789\nx") + [REW]
    # the longest candidate alone gets exactly the same input
    alone = encode_group(TOK, "0123456789", "ab", ["wxyz"], max_length=18)
    assert alone.full(0).tolist() == g.full(1).tolist()
    # the shorter one alone would keep one more prompt token: documented
    short_alone = encode_group(TOK, "0123456789", "ab", ["x"], max_length=18)
    assert len(short_alone.full(0)) == len(g.full(0)) + 2


def test_many_candidates_each_match_the_serving_string():
    cands = ["short", "a much longer candidate", "mid ✓ length", "x", "short"]
    g = encode_group(TOK, "What now?", "the reference", cands)
    check_split(g, [full_ids("What now?", "the reference", c) for c in cands])


def random_text(rng, max_words=8, newlines=True, start=()):
    """Words of the BPE's corpus, often starting like its answers and ending like its questions,
    so that merges across the piece boundaries ("?\nthe ") are common; sometimes cut mid-word."""
    words = [str(rng.choice(start))] if start and rng.random() < 0.7 else []
    words += [str(w) for w in rng.choice(WORDS, size=int(rng.integers(0, max_words)))]
    seps = [" ", " ", " ", "\n"] if newlines else [" "]
    out = "".join(w + str(rng.choice(seps)) for w in words[:-1]) + "".join(words[-1:])
    if rng.random() < 0.5:
        out += "?" if rng.random() < 0.7 else " "
    if rng.random() < 0.2:
        out = out[: int(rng.integers(0, len(out) + 1))]
    return out


def random_groups(n, seed):
    rng = np.random.default_rng(seed)
    starts = [w + " " for w in WORDS[:4]]
    groups = []
    for _ in range(n):
        prompt = random_text(rng)
        if rng.random() < 0.3:  # a multi-turn message list
            prompt = [{"role": "user", "content": random_text(rng)} for _ in range(3)]
        ref = random_text(rng, start=starts)
        common = random_text(rng, max_words=3, start=starts)  # candidates often share a start
        k = int(rng.integers(1, 5))
        cands = [common + random_text(rng) if rng.random() < 0.5 else random_text(rng, start=starts)
                 for _ in range(k)]
        if rng.random() < 0.2:
            cands.append(cands[0])  # identical candidates
        groups.append((prompt, ref, cands, "sft" if rng.random() < 0.7 else "pretrain"))
    return groups


def test_batched_equals_one_by_one_and_the_serving_strings():
    groups = random_groups(200, seed=1)
    batch = encode_groups(TOK, [g[0] for g in groups], [g[1] for g in groups],
                          [g[2] for g in groups], wrapper=[g[3] for g in groups])
    for (p, r, cs, w), got in zip(groups, batch, strict=True):
        one = encode_group(TOK, p, r, cs, wrapper=w)
        assert got.prefix.tolist() == one.prefix.tolist()
        assert [c.tolist() for c in got.candidates] == [c.tolist() for c in one.candidates]
        check_split(got, [full_ids(p, r, c, w) for c in cs])


# --- text is content, never structure -------------------------------------------------------------

LITERALS = (REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, "<s>", "</s>")


@pytest.mark.parametrize("wrapper", ["sft", "pretrain"])
def test_literals_in_texts_stay_text_with_the_byte_tokenizer(wrapper):
    p, r, cs = f"why{REWARD_SEP_TEXT}?", f"a{REWARD_TOKEN_TEXT}", [f"<s>b{REWARD_SEP_TEXT}", "c"]
    g = encode_group(TOK, p, r, cs, wrapper=wrapper)
    nl = "\n" if wrapper == "sft" else ""
    for i, c in enumerate(cs):
        assert g.full(i).tolist() == ([BOS] + b(p + nl + r) + [SEP] + b(p + nl + c) + [REW])
    # truncation counts a literal as the text it is: 10 bytes, not one token (4 kept: BOS is the 5th)
    g = encode_group(TOK, "p", REWARD_SEP_TEXT + "xyz", ["c"], max_response=5)
    assert g.full(0).tolist() == [BOS] + b("p\n<|re") + [SEP] + b("p\nc") + [REW]


# --- group capacity: a group as stored fits the pack ----------------------------------------------

def stored(g):
    return len(g.prefix) + sum(len(c) for c in g.candidates)


def test_group_capacity_shortens_the_prompt_of_a_group_too_long_for_the_pack():
    # The paper's rule bounds each candidate's input (16384 at the defaults), not the group, which
    # holds the prompt twice, the reference and both candidates (4095 bytes each): 18291 tokens here.
    p, r, cs = "q" * 3000, "r" * 4096, ["c" * 4096, "x" * 4096]
    rule = encode_group(TOK, p, r, cs)
    assert stored(rule) == 18291 and rule.prompt_cut_to_fit == 0
    g = encode_group(TOK, p, r, cs, group_capacity=16384)
    # BOS, <|reward|>, two "\n", the reference, two candidates with a reward token each: 12291;
    # the prompt's two copies get 4092 of the other 4093
    assert stored(g) == 16383 and g.prompt_cut_to_fit == 3000 - 2046
    check_split(g, [full_ids("q" * 2046, r[:4095], c[:4095]) for c in cs])
    # a group that fits is left to the paper's rule
    same = encode_group(TOK, p, r, cs, group_capacity=18291)
    assert same.prompt_cut_to_fit == 0 and [same.full(i).tolist() for i in range(2)] == \
        [rule.full(i).tolist() for i in range(2)]


@pytest.mark.parametrize("seed", [0, 1])
def test_group_capacity_bounds_every_group_that_can_fit(seed):
    rng = np.random.default_rng(seed)
    chars = list("ab é😀\n")

    def text(longest):
        return "".join(rng.choice(chars, size=int(rng.integers(0, longest))))

    groups = [(text(80) + "p", text(40), [text(40) for _ in range(int(rng.integers(1, 5)))],
               "sft" if rng.random() < 0.6 else "pretrain") for _ in range(400)]
    max_length, max_response, cap = 100, 30, 120
    args = ([g[0] for g in groups], [g[1] for g in groups], [g[2] for g in groups], [g[3] for g in groups])
    rule = encode_groups(TOK, *args, max_length=max_length, max_response=max_response)
    capped = encode_groups(TOK, *args, max_length=max_length, max_response=max_response, group_capacity=cap)
    without = encode_groups(TOK, [""] * len(groups), *args[1:], max_length=max_length, max_response=max_response)
    shortened = dropped = 0
    for (p, _, cs, w), a, g, e in zip(groups, rule, capped, without):
        k, fulls = len(cs), [g.full(i) for i in range(len(cs))]
        kept = (len(fulls[0]) - len(e.full(0))) // 2  # the prompt's bytes, in each of its two places
        assert fulls[0][1:1 + kept].tolist() == list(p.encode()[len(p.encode()) - kept:])  # a tail
        # The count the capacity is held to: the group without a prompt, each candidate whole
        # (only BOS, the reference side and a shared "\n" counted once).
        head = e.full(0).tolist().index(SEP) + 1
        shared = int(w == "sft" and all(len(e.full(i)) > head + 1 for i in range(k)))
        counted = sum(len(e.full(i)) for i in range(k)) - (k - 1) * (head + shared)
        assert stored(e) <= counted
        if g.prompt_cut_to_fit == 0:
            assert [f.tolist() for f in fulls] == [a.full(i).tolist() for i in range(k)]
        else:
            shortened += 1
            assert kept <= (len(a.full(0)) - len(e.full(0))) // 2  # less, unless a character was cut
        if counted <= cap:
            assert stored(g) <= cap
            # as long a tail as fits (a cut through a character drops it: up to 3 bytes fewer)
            assert g.prompt_cut_to_fit == 0 or counted + 2 * (kept + 4) > cap
        else:
            dropped += 1
            assert kept == 0  # even without a prompt it does not fit: the caller rejects it
        assert stored(g) <= cap or stored(e) > cap or counted > cap
        assert stored(a) <= cap or g.prompt_cut_to_fit > 0
    assert shortened > 50 and dropped > 5


def test_group_capacity_must_be_a_count():
    with pytest.raises(ValueError, match="group_capacity"):
        encode_group(TOK, "p", "r", ["c"], group_capacity=-1)


# --- the embedded default's data -----------------------------------------------------------------

# sha256 of a small embedded-default data set's encoded groups: the training data must not change.
# At 1024 (as trained: nothing is cut) computed with the encoder as it was before special ids were
# placed by structure; at 64 (every prompt cut) recorded when truncation came to count each piece's
# BOS as the training code does.
DEFAULT_DATA_SHA256 = {
    ("sft", 1024): "f62fe09db3c352f51a0a6806731f18aae5dee6881039def0716b9efad7ea7730",
    ("sft", 64): "3705a6943886e6f98595a4a63f08d29b61db61beb991e18c562881516391a31e",
    ("pretrain", 1024): "e5e9bf775e134f64e634c66819e3c1e353b3e14ec96903db4ebf09384691ce35",
    ("pretrain", 64): "4f6a7806f33335f9a9041dc8e2ebbe3a793cf6b76e8ba2cdd14424c74fad8bd6",
}


@pytest.mark.parametrize("max_length", [1024, 64])
@pytest.mark.parametrize("wrapper", ["sft", "pretrain"])
def test_embedded_default_data_is_unchanged(wrapper, max_length):
    import hashlib

    from polar.pretrain_data import SyntheticDataConfig, encode_triplets, make_splits

    splits = make_splits(SyntheticDataConfig(train_triplets=600, eval_triplets=100, prompts=300,
                                             wrapper=wrapper))
    h = hashlib.sha256()
    for name in ("train", "eval_seen", "eval_held_out"):
        for g, _ in encode_triplets(TOK, getattr(splits, name), wrapper, max_length=max_length):
            h.update(g.prefix.tobytes() + b"|" + b"/".join(c.tobytes() for c in g.candidates) + b";")
    assert h.hexdigest() == DEFAULT_DATA_SHA256[wrapper, max_length], \
        "the embedded default's encoded data changed (if on purpose, update DEFAULT_DATA_SHA256)"
