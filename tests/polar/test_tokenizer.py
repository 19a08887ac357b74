import numpy as np
import pytest

from polar.tokenizer import REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, ByteTokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def test_ids_are_utf8_bytes_without_offset(tok):
    ids = tok.encode("Hé!")
    assert ids.dtype == np.int32
    assert ids.tolist() == [0x48, 0xC3, 0xA9, 0x21]


def test_special_ids_are_distinct_and_outside_the_byte_range(tok):
    special = [tok.bos_id, tok.pad_id, tok.reward_sep_id, tok.reward_token_id]
    assert len(set(special)) == 4
    assert all(256 <= s < tok.vocab_size for s in special)
    assert tok.vocab_size == 260
    assert isinstance(tok, Tokenizer)


def test_literal_reward_tokens_map_to_their_ids(tok):
    ids = tok.encode(f"a{REWARD_SEP_TEXT}b{REWARD_TOKEN_TEXT}")
    assert ids.tolist() == [ord("a"), tok.reward_sep_id, ord("b"), tok.reward_token_id]


def test_serving_text_and_appended_id_agree(tok):
    text = "prompt\nanswer"
    served = tok.encode(text + REWARD_TOKEN_TEXT)
    trained = np.append(tok.encode(text), tok.reward_token_id)
    np.testing.assert_array_equal(served, trained)


def test_partial_literals_stay_bytes(tok):
    text = "<|reward| [UNUSED_TOKEN_13] <|rew"
    assert tok.encode(text).tolist() == list(text.encode())


def test_adjacent_literals(tok):
    ids = tok.encode(REWARD_TOKEN_TEXT * 2 + REWARD_SEP_TEXT)
    assert ids.tolist() == [tok.reward_token_id, tok.reward_token_id, tok.reward_sep_id]


def test_empty_text(tok):
    ids = tok.encode("")
    assert ids.dtype == np.int32 and ids.size == 0
    assert tok.decode(ids) == ""


@pytest.mark.parametrize("text", ["plain", "ünïcödé 漢字 🎉", "",
                                  f"x{REWARD_SEP_TEXT}y{REWARD_TOKEN_TEXT}"])
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_drops_control_tokens(tok):
    ids = [tok.bos_id, ord("h"), ord("i"), tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == "hi"
    assert tok.decode(np.array(ids, dtype=np.int64)) == "hi"


def test_decode_of_a_cut_multibyte_char_does_not_raise(tok):
    ids = tok.encode("é")[:1]
    assert tok.decode(ids) == "\ufffd"


def test_encode_batch_matches_encode(tok):
    texts = ["abc", "", "ünï", f"q{REWARD_TOKEN_TEXT}", "z" * 1000, REWARD_SEP_TEXT]
    batch = tok.encode_batch(texts)
    assert len(batch) == len(texts)
    for got, text in zip(batch, texts):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, tok.encode(text))


def test_encode_batch_empty_list(tok):
    assert tok.encode_batch([]) == []


@pytest.mark.parametrize("bad", [b"bytes", 3, None, ["ok"]])
def test_encode_rejects_non_str(tok, bad):
    with pytest.raises(TypeError, match="encode expects str"):
        tok.encode(bad)


@pytest.mark.parametrize("bad", ["a string", ("ok", 3), ["ok", b"no"], None])
def test_encode_batch_rejects_bad_input(tok, bad):
    with pytest.raises(TypeError, match="encode_batch"):
        tok.encode_batch(bad)


def test_decode_rejects_bad_input(tok):
    with pytest.raises(TypeError):
        tok.decode("text")
    with pytest.raises(TypeError):
        tok.decode([1.5, 2.0])
    with pytest.raises(TypeError):
        tok.decode([[1, 2]])
    with pytest.raises(ValueError, match="ids must lie"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="ids must lie"):
        tok.decode([-1])
