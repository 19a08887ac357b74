import numpy as np
import pytest

from polar.format import as_text, build_text, encode_group, prompt_budget
from polar.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BOS, SEP, REW = TOK.bos_id, TOK.reward_sep_id, TOK.reward_token_id


def b(text):
    return list(text.encode())


def full_ids(prompt, reference, candidate, wrapper="sft"):
    """The serving route: literal string, tokenized whole, BOS prepended."""
    return [BOS] + TOK.encode(build_text(prompt, reference, candidate, wrapper)).tolist()


def test_sft_hand_worked():
    g = encode_group(TOK, "Hi", "AB", ["C"])
    assert g.prefix.dtype == np.int32 and g.candidates[0].dtype == np.int32
    assert g.prefix.tolist() == [BOS] + b("Hi\nAB") + [SEP] + b("Hi\n")
    assert g.candidates[0].tolist() == b("C") + [REW]
    assert build_text("Hi", "AB", "C") == "Hi\nAB<|reward|>Hi\nC[UNUSED_TOKEN_130]"


def test_pretrain_hand_worked():
    g = encode_group(TOK, "Hi", "AB", ["C"], wrapper="pretrain")
    assert g.prefix.tolist() == [BOS] + b("HiAB") + [SEP] + b("Hi")
    assert g.candidates[0].tolist() == b("C") + [REW]
    assert build_text("Hi", "AB", "C", "pretrain") == "HiAB<|reward|>HiC[UNUSED_TOKEN_130]"


def test_message_lists_join_contents_and_drop_roles():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    assert as_text(msgs) == "be brief\n2+2?\n4\nand 3+3?"
    ref = [{"role": "assistant", "content": "six"}]
    g = encode_group(TOK, msgs, ref, [[{"role": "assistant", "content": "6"}]])
    assert g.full(0).tolist() == ([BOS] + b("be brief\n2+2?\n4\nand 3+3?\nsix") + [SEP]
                                  + b("be brief\n2+2?\n4\nand 3+3?\n6") + [REW])


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


def test_truncation_budgets_exactly():
    # reference 8 -> 5 (head), candidate 3, prompt budget (20 - 4 - 5 - 3) // 2 = 4 (tail).
    g = encode_group(TOK, "0123456789", "abcdefgh", ["xyz"], max_length=20, max_response=5)
    assert g.full(0).tolist() == [BOS] + b("6789\nabcde") + [SEP] + b("6789\nxyz") + [REW]
    # BOS is not part of max_length, matching the reserved 4 = <|reward|> + two "\n" + reward token.
    assert len(g.full(0)) == 20 + 1


def test_odd_budget_rounds_down():
    assert prompt_budget(21, 5, 3) == 4
    assert prompt_budget(16384, 4096, 4096) == 4094
    assert prompt_budget(10, 5, 5) == 0


def test_budget_exhausted_drops_the_prompt():
    g = encode_group(TOK, "long prompt", "abcdefgh", ["xyz"], max_length=10, max_response=5)
    assert g.full(0).tolist() == [BOS] + b("\nabcde") + [SEP] + b("\nxyz") + [REW]


def test_candidate_head_is_kept():
    g = encode_group(TOK, "p", "r", ["0123456789"], max_response=4)
    assert g.candidates[0].tolist() == b("0123") + [REW]


def test_defaults_match_polar():
    ref, cand = "r" * 5000, "c" * 5000
    prompt = "p" * 20000
    g = encode_group(TOK, prompt, ref, [cand])
    n_prompt = (16384 - 4 - 4096 - 4096) // 2
    assert len(g.full(0)) == 1 + 2 * n_prompt + 4096 + 4096 + 4


def test_unicode_truncation_is_per_token():
    # Byte tokens: a tail cut may start inside a multi-byte character, as with any token cut.
    g = encode_group(TOK, "日本", "r", ["c"], max_length=4 + 1 + 1 + 2 * 4)
    prompt = "日本".encode()[-4:]
    assert g.prefix.tolist() == [BOS] + list(prompt) + b("\nr") + [SEP] + list(prompt) + b("\n")


def test_group_shares_prefix_and_budgets_with_the_longest_candidate():
    g = encode_group(TOK, "0123456789", "ab", ["x", "wxyz"], max_length=16)
    # budget (16 - 4 - 2 - 4) // 2 = 3, for both candidates
    assert g.prefix.tolist() == [BOS] + b("789\nab") + [SEP] + b("789\n")
    assert [c.tolist() for c in g.candidates] == [b("x") + [REW], b("wxyz") + [REW]]
    # the longest candidate alone gets exactly the same input
    alone = encode_group(TOK, "0123456789", "ab", ["wxyz"], max_length=16)
    assert alone.full(0).tolist() == g.full(1).tolist()
    # the shorter one alone would keep one more prompt token: documented
    short_alone = encode_group(TOK, "0123456789", "ab", ["x"], max_length=16)
    assert len(short_alone.prefix) == len(g.prefix) + 2


def test_empty_candidate_follows_the_training_code():
    g = encode_group(TOK, "p", "r", [""])
    assert g.full(0).tolist() == [BOS] + b("p\nr") + [SEP] + b("p") + [REW]


def test_empty_reference_drops_its_newline():
    g = encode_group(TOK, "p", "", ["c"])
    assert g.prefix.tolist() == [BOS] + b("p") + [SEP] + b("p\n")


def test_group_with_an_empty_candidate_moves_the_newline_into_candidates():
    g = encode_group(TOK, "p", "r", ["", "c"])
    assert g.prefix.tolist() == [BOS] + b("p\nr") + [SEP] + b("p")
    assert [c.tolist() for c in g.candidates] == [[REW], b("\nc") + [REW]]
    for i, cand in enumerate(["", "c"]):
        assert g.full(i).tolist() == full_ids("p", "r", cand)


def test_pretrain_group_with_empty_candidate():
    g = encode_group(TOK, "p", "r", ["", "c"], wrapper="pretrain")
    assert g.prefix.tolist() == [BOS] + b("pr") + [SEP] + b("p")
    assert [c.tolist() for c in g.candidates] == [[REW], b("c") + [REW]]


def test_many_candidates_each_match_the_serving_string():
    cands = ["short", "a much longer candidate", "mid ✓ length", "x"]
    g = encode_group(TOK, "What now?", "the reference", cands)
    for i, c in enumerate(cands):
        assert g.full(i).tolist() == full_ids("What now?", "the reference", c)
