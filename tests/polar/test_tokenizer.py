import re
from pathlib import Path

import numpy as np
import pytest

import polar.tokenizer as tokenizer_module
from polar.tokenizer import (REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, ByteTokenizer, HFTokenizer,
                             Tokenizer, load_tokenizer)


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


def test_served_reading_maps_literals_to_their_ids(tok):
    ids = tok.encode_served(f"a{REWARD_SEP_TEXT}b{REWARD_TOKEN_TEXT}")
    assert ids.dtype == np.int32
    assert ids.tolist() == [tok.bos_id, ord("a"), tok.reward_sep_id, ord("b"), tok.reward_token_id]


def test_content_reading_keeps_literals_as_text(tok):
    # text is content, never structure: no literal becomes a special id
    text = f"a{REWARD_SEP_TEXT}b{REWARD_TOKEN_TEXT}<s>"
    assert tok.encode(text).tolist() == list(text.encode())
    assert [x.tolist() for x in tok.encode_batch([text, REWARD_SEP_TEXT])] == \
        [list(text.encode()), list(REWARD_SEP_TEXT.encode())]


def test_serving_text_and_structural_ids_agree(tok):
    served = tok.encode_served("prompt\nref" + REWARD_SEP_TEXT + "prompt\nanswer" + REWARD_TOKEN_TEXT)
    trained = ([tok.bos_id] + tok.encode("prompt\nref").tolist() + [tok.reward_sep_id]
               + tok.encode("prompt\nanswer").tolist() + [tok.reward_token_id])
    assert served.tolist() == trained
    tok.check_structure()


def test_partial_literals_stay_bytes(tok):
    text = "<|reward| [UNUSED_TOKEN_13] <|rew"
    assert tok.encode_served(text).tolist() == [tok.bos_id] + list(text.encode())


def test_adjacent_literals(tok):
    ids = tok.encode_served(REWARD_TOKEN_TEXT * 2 + REWARD_SEP_TEXT)
    assert ids.tolist() == [tok.bos_id, tok.reward_token_id, tok.reward_token_id, tok.reward_sep_id]


def test_served_batch_matches_one_by_one(tok):
    texts = ["", "x", f"é{REWARD_TOKEN_TEXT}\0{REWARD_SEP_TEXT}", "\0", "<|reward|"]
    batch = tok.encode_served_batch(texts)
    assert [b.tolist() for b in batch] == [tok.encode_served(t).tolist() for t in texts]
    assert tok.encode_served_batch([]) == []


def test_decode_skipping_special_tokens(tok):
    ids = tok.encode_served(f"a{REWARD_SEP_TEXT}b{REWARD_TOKEN_TEXT}")
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.decode(ids) == f"a{REWARD_SEP_TEXT}b{REWARD_TOKEN_TEXT}"
    # the bytes on both sides of a dropped special join up into one character
    e = list("é".encode())
    assert tok.decode([e[0], tok.reward_sep_id, e[1]], skip_special_tokens=True) == "é"
    assert tok.decode_batch([ids, e[:1]], skip_special_tokens=True) == ["ab", "\ufffd"]


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


# --- offsets -------------------------------------------------------------------------------------

def test_byte_offsets_are_character_spans(tok):
    spans = tok.offsets_batch(["hé😀"])[0]
    # h, then both bytes of é, then the four bytes of the emoji, each with its character's span
    assert spans.dtype == np.int64
    assert spans.tolist() == [[0, 1], [1, 2], [1, 2], [2, 3], [2, 3], [2, 3], [2, 3]]


def test_byte_offsets_of_literals_are_those_of_text(tok):
    text = f"é{REWARD_SEP_TEXT}x"
    spans = tok.offsets_batch(["", text, "ab"])
    assert [s.tolist() for s in spans] == [
        [], [[0, 1], [0, 1]] + [[i, i + 1] for i in range(1, 12)], [[0, 1], [1, 2]]]


def test_byte_offsets_are_local_to_each_text(tok):
    texts = ["ünï", "", "日本語", "a\0b", f"{REWARD_TOKEN_TEXT}"] * 3
    for text, spans, ids in zip(texts, tok.offsets_batch(texts), tok.encode_batch(texts),
                                  strict=True):
        assert len(spans) == len(ids)
        # each token's span holds a text that, encoded, contains that token's byte
        for (s, e), i in zip(spans.tolist(), ids.tolist()):
            assert i in tok.encode(text[s:e]).tolist()


def test_nul_bytes_in_text_are_kept(tok):
    # the batch encoder joins texts with NUL; a NUL inside a text must still come out
    assert [x.tolist() for x in tok.encode_batch(["a\0", "\0b", "\0"])] == [[97, 0], [0, 98], [0]]


def test_offsets_batch_rejects_bad_input(tok):
    with pytest.raises(TypeError, match="offsets_batch"):
        tok.offsets_batch("text")


# --- HF tokenizers -------------------------------------------------------------------------------

WORDS = ("the a cat dog sat on mat why how answer question reward model policy text token one two "
         "three über naïve 日本 😀").split()


def corpus(n: int, seed: int = 0) -> list[str]:
    """Prompt/answer lines whose answers start with frequent words, so that a BPE without
    pre-tokenization learns merges like "\\nthe" across the prompt/response boundary."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS, size=rng.integers(2, 8)))
        a = " ".join(rng.choice(WORDS[:4], size=2)) + " " + " ".join(rng.choice(WORDS, size=5))
        lines.append(f"{q}?\n{a}.")
    return lines


def train_bpe(directory, specials=("<s>", "</s>", REWARD_SEP_TEXT, REWARD_TOKEN_TEXT),
              vocab_size: int = 700, merge_across_spaces: bool = True, truncate: int = 0) -> str:
    """A byte-level BPE trained on `corpus`, saved as directory/tokenizer.json. With
    `merge_across_spaces` there is no pre-tokenization: merges cross spaces and newlines."""
    from tokenizers import Tokenizer as Lib, decoders, models, pre_tokenizers, trainers

    lib = Lib(models.BPE())
    lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                 use_regex=not merge_across_spaces)
    lib.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    lib.train_from_iterator(corpus(400), trainer)
    if truncate:
        lib.enable_truncation(truncate)
    directory.mkdir(parents=True, exist_ok=True)
    lib.save(str(directory / "tokenizer.json"))
    return str(directory)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    return load_tokenizer(bpe_dir)


def test_load_tokenizer_picks_the_kind(bpe_dir, tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(bpe_dir), HFTokenizer)
    # the tokenizer.json file itself works too
    assert isinstance(load_tokenizer(str(Path(bpe_dir) / "tokenizer.json")), HFTokenizer)
    with pytest.raises(TypeError, match="load_tokenizer"):
        load_tokenizer(3)


def test_hf_special_ids_come_from_the_vocabulary(bpe):
    lib = bpe._tok
    assert bpe.bos_id == lib.token_to_id("<s>") and bpe.pad_id == lib.token_to_id("</s>")
    assert bpe.reward_sep_id == lib.token_to_id(REWARD_SEP_TEXT)
    assert bpe.reward_token_id == lib.token_to_id(REWARD_TOKEN_TEXT)
    assert len({bpe.bos_id, bpe.pad_id, bpe.reward_sep_id, bpe.reward_token_id}) == 4
    assert bpe.vocab_size == lib.get_vocab_size(with_added_tokens=True)


def test_hf_encode_adds_nothing_and_reads_literals_as_text(bpe):
    ids = bpe.encode("the cat")
    assert ids.dtype == np.int32 and bpe.bos_id not in ids.tolist() and len(ids) > 0
    specials = {bpe.bos_id, bpe.pad_id, bpe.reward_sep_id, bpe.reward_token_id}
    for literal in (REWARD_TOKEN_TEXT, REWARD_SEP_TEXT, "<s>", "</s>"):
        for ids in [bpe.encode(f"a {literal} b")] + bpe.encode_batch([literal, literal], True):
            assert not specials & set(ids.tolist()), literal
        assert bpe.decode(bpe.encode(literal)) == literal
    assert bpe.encode("").tolist() == []


def test_hf_served_reading_maps_literals(bpe):
    assert bpe.encode_served(REWARD_TOKEN_TEXT).tolist() == [bpe.bos_id, bpe.reward_token_id]
    assert bpe.encode_served(REWARD_SEP_TEXT).tolist() == [bpe.bos_id, bpe.reward_sep_id]
    assert bpe.encode_served("<s>").tolist() == [bpe.bos_id, bpe.bos_id]
    assert bpe.encode_served("").tolist() == [bpe.bos_id]


@pytest.mark.parametrize("first, after", [("why the cat?\nthe dog sat", "why the cat?\na dog"),
                                          ("über naïve 日本 😀 ", " x"), ("\n\n  x", ""),
                                          ("", "the")])
def test_hf_serving_and_training_forms_agree(bpe, first, after):
    served = bpe.encode_served(first + REWARD_SEP_TEXT + after + REWARD_TOKEN_TEXT).tolist()
    assert served == ([bpe.bos_id] + bpe.encode(first).tolist() + [bpe.reward_sep_id]
                      + bpe.encode_batch([after], after_special=True)[0].tolist()
                      + [bpe.reward_token_id])


def test_hf_batch_offsets_and_decode(bpe):
    texts = corpus(30, seed=1) + ["", "日本😀x", f"a{REWARD_SEP_TEXT}b"]
    batch = bpe.encode_batch(texts)
    spans = bpe.offsets_batch(texts)
    for text, ids, sp in zip(texts, batch, spans, strict=True):
        assert ids.tolist() == bpe.encode(text).tolist()
        assert sp.shape == (len(ids), 2) and sp.dtype == np.int64
        assert (sp[:, 0] <= sp[:, 1]).all() and (sp[:, 1] <= len(text)).all()
        assert bpe.decode(ids) == text
    # an emoji the BPE never saw stays split in bytes: all its tokens share its character span
    sp = bpe.offsets_batch(["🎉"])[0]
    assert len(sp) > 1 and (sp == [0, 1]).all()


def test_hf_offsets_are_not_trimmed_by_the_post_processor(bpe_dir, tmp_path):
    """A ByteLevel post-processor with trim_offsets would start " cat" after its space; the
    spans are those of the tokens' own text, which a cut needs."""
    from tokenizers import Tokenizer as Lib, processors

    lib = Lib.from_file(str(Path(bpe_dir) / "tokenizer.json"))
    lib.post_processor = processors.ByteLevel(trim_offsets=True)
    (tmp_path / "trim").mkdir()
    lib.save(str(tmp_path / "trim" / "tokenizer.json"))
    trim, plain = load_tokenizer(str(tmp_path / "trim")), load_tokenizer(bpe_dir)
    texts = corpus(20, seed=2)
    for text, a, b, ids in zip(texts, trim.offsets_batch(texts), plain.offsets_batch(texts), trim.encode_batch(texts),
                                 strict=True):
        assert a.tolist() == b.tolist() and len(a) == len(ids)
        assert "".join(text[s:e] for s, e in a.tolist()) == text  # the spans tile the text


def long_texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = rng.choice(WORDS + ["\n", "  "], size=int(rng.integers(1, 3000)))
        out.append(" ".join(words))
    return out


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_edge_offsets_are_the_whole_texts_rows_from_a_bounded_slice(kind, bpe):
    """Truncation asks for the spans of a text's first or last few tokens: they equal those of
    the whole text, computed from a slice about the size of what is asked, not from the text."""
    t = ByteTokenizer() if kind == "byte" else load_tokenizer(str(bpe.path.parent))
    seen = []
    if kind == "byte":
        real = t._encode_flat

        def spy(texts, with_offsets, literals):
            if with_offsets:
                seen.extend(len(x) for x in texts)
            return real(texts, with_offsets, literals)

        t._encode_flat = spy
    else:
        real_lib = t._tok_offsets

        class Spy:
            def encode_batch(self, texts, **kw):
                seen.extend(len(x) for x in texts)
                return real_lib.encode_batch(texts, **kw)

        t._tok_offsets = Spy()
    texts = long_texts(40, seed=3)
    whole = bpe.offsets_batch(texts) if kind == "bpe" else ByteTokenizer().offsets_batch(texts)
    ids = t.encode_batch(texts)
    for n in (1, 7, 100):
        for tail in (False, True):
            seen.clear()
            edges = [x[len(x) - min(n, len(x)):] if tail else x[:n] for x in ids]
            got = t.edge_offsets_batch(texts, edges, tail)
            for g, w, e in zip(got, whole, edges, strict=True):
                assert g.tolist() == (w[len(w) - len(e):] if tail else w[:len(e)]).tolist()
            bound = n if kind == "byte" else \
                tokenizer_module._EDGE_CHARS_PER_TOKEN * (n + tokenizer_module._EDGE_MARGIN)
            assert max(seen) <= bound < max(map(len, texts))


def test_hf_decode_drops_control_tokens(bpe):
    ids = [bpe.bos_id] + bpe.encode("the cat").tolist() + [bpe.reward_token_id, bpe.pad_id]
    assert bpe.decode(ids) == "the cat" + REWARD_TOKEN_TEXT
    with pytest.raises(ValueError, match="ids must lie"):
        bpe.decode([bpe.vocab_size])


def test_hf_adds_missing_reward_tokens(tmp_path):
    tok = load_tokenizer(train_bpe(tmp_path, specials=("<s>", "</s>")))
    base = tok._tok.get_vocab_size(with_added_tokens=False)
    assert {tok.reward_sep_id, tok.reward_token_id} == {base, base + 1}
    assert tok.vocab_size == base + 2
    assert tok.encode_served(f"the{REWARD_SEP_TEXT}cat{REWARD_TOKEN_TEXT}").tolist()[-1] == \
        tok.reward_token_id
    assert tok.encode_served(REWARD_SEP_TEXT).tolist() == [tok.bos_id, tok.reward_sep_id]


def test_hf_configurable_special_strings(tmp_path):
    d = train_bpe(tmp_path, specials=("<bos>", "<pad>"))
    tok = HFTokenizer(d, bos="<bos>", pad="<pad>", reward_sep="<sep>", reward_token="<score>")
    assert tok.reward_sep_text == "<sep>" and tok.reward_token_text == "<score>"
    assert tok.encode_served("x<score>").tolist()[-1] == tok.reward_token_id
    assert tok.reward_token_id not in tok.encode("x<score>").tolist()
    assert tok.bos_id == tok._tok.token_to_id("<bos>")
    with pytest.raises(ValueError, match="bos="):
        HFTokenizer(d)  # no "<s>" in this vocabulary


def test_a_special_token_missing_from_the_vocabulary_is_named_where_a_cli_user_sets_it(tmp_path):
    """load_tokenizer is how every command and config reads a tokenizer directory: its message said only
    "pass the tokenizer's own token as bos=", an argument no command takes, also of a token that
    polar_tokenizer.json had named. It names that file, and says when the token is the default."""
    import json

    d = Path(train_bpe(tmp_path / "no_s", specials=("<bos>", "<pad>")))
    settings = re.escape(str(d / "polar_tokenizer.json"))
    with pytest.raises(ValueError, match=rf"no '<s>' for the bos token \(the default: InternLM2's.*"
                                         rf"\{{\"bos\": \.\.\.\}} in {settings}"):
        load_tokenizer(str(d))
    (d / "polar_tokenizer.json").write_text(json.dumps({"bos": "<bos>", "pad": "<nope>"}))
    with pytest.raises(ValueError, match=rf"no '<nope>' for the pad token; name the tokenizer's own as "
                                         rf"\{{\"pad\": \.\.\.\}} in {settings}"):
        load_tokenizer(str(d))


def test_hf_truncation_in_the_file_is_switched_off(tmp_path):
    tok = load_tokenizer(train_bpe(tmp_path, truncate=3))
    assert len(tok.encode(" ".join(WORDS))) > 3


def _word_level_file(directory, vocab: dict) -> str:
    from tokenizers import Tokenizer as Lib, models, pre_tokenizers

    lib = Lib(models.WordLevel(vocab, unk_token="<unk>"))
    lib.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    lib.save(str(directory / "tokenizer.json"))
    return str(directory)


def test_internlm2_ids_are_found_by_string(tmp_path):
    # The released POLAR vocabulary's ids, placed where InternLM2 has them.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4,
             REWARD_SEP_TEXT: 92397, REWARD_TOKEN_TEXT: 92527}
    tok = load_tokenizer(_word_level_file(tmp_path / "internlm2", vocab))
    assert (tok.bos_id, tok.pad_id, tok.reward_sep_id, tok.reward_token_id) == (1, 2, 92397, 92527)
    assert tok.vocab_size >= 92528
    text = f"hello{REWARD_SEP_TEXT}world"
    assert tok.encode_served(text + REWARD_TOKEN_TEXT).tolist() == [1, 3, 92397, 4, 92527]
    # the same strings elsewhere: the ids follow the strings, not InternLM2's numbers
    moved = {"<unk>": 0, "</s>": 1, "<s>": 2, REWARD_TOKEN_TEXT: 3, REWARD_SEP_TEXT: 4, "hi": 5}
    tok = load_tokenizer(_word_level_file(tmp_path / "moved", moved))
    assert (tok.bos_id, tok.pad_id, tok.reward_sep_id, tok.reward_token_id) == (2, 1, 4, 3)


def test_missing_tokenizer_paths_are_clear_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(str(missing))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir.*tokenizer.json"):
        load_tokenizer(str(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad"):
        load_tokenizer(str(bad))



def test_a_tokenizer_file_of_another_name_is_refused(bpe_dir, tmp_path):
    # A run records and copies the tokenizer's directory (polar.checkpoint_tokenizer.save_beside, the
    # data's metadata): a run tokenized with d/other.json would carry d/tokenizer.json's ids instead.
    import shutil

    from polar.checkpoint_tokenizer import find, save_beside

    d = tmp_path / "d"
    d.mkdir()
    train_bpe(d, vocab_size=300)  # d/tokenizer.json: another tokenizer than other.json
    other = d / "other.json"
    shutil.copyfile(Path(bpe_dir) / "tokenizer.json", other)
    with pytest.raises(ValueError, match="must be named tokenizer.json"):
        load_tokenizer(str(other))
    with pytest.raises(ValueError, match="must be named tokenizer.json"):
        HFTokenizer(other)
    # what a run that accepted it would have carried
    save_beside(str(tmp_path / "ckpt"), str(d / "tokenizer.json"))
    carried = load_tokenizer(find(str(tmp_path / "ckpt" / "step_1")))
    assert carried.encode("why the cat sat").tolist() != load_tokenizer(bpe_dir).encode("why the cat sat").tolist()

# --- the server's reading of a piece after a special token ---------------------------------------

def _metaspace_file(directory, prepend_scheme: str) -> str:
    """A SentencePiece-style tokenizer: Metaspace marks words with "▁"; with prepend_scheme
    "first" only the start of the whole string gets a leading marker."""
    from tokenizers import Tokenizer as Lib, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "b": 5, "▁a": 6, "▁b": 7, "\n": 8,
             REWARD_SEP_TEXT: 9, REWARD_TOKEN_TEXT: 10}
    lib = Lib(models.BPE(vocab, [("▁", "a"), ("▁", "b")], unk_token="<unk>"))
    lib.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    directory.mkdir(parents=True, exist_ok=True)
    lib.save(str(directory / "tokenizer.json"))
    return str(directory)


@pytest.mark.parametrize("scheme", ["first", "always", "never"])
def test_pieces_after_a_special_get_the_servers_ids(tmp_path, scheme):
    tok = load_tokenizer(_metaspace_file(tmp_path / scheme, scheme))  # check_structure passed
    served = tok.encode_served(f"a b{REWARD_SEP_TEXT}b a{REWARD_TOKEN_TEXT}").tolist()
    trained = ([tok.bos_id] + tok.encode("a b").tolist() + [tok.reward_sep_id]
               + tok.encode_batch(["b a"], after_special=True)[0].tolist() + [tok.reward_token_id])
    assert served == trained
    # the premise: with "first", a piece alone is read differently from the same piece after a
    # special token (its leading "▁"), so after_special matters
    alone, after = tok.encode("b").tolist(), tok.encode_batch(["b"], after_special=True)[0].tolist()
    assert (alone != after) == (scheme == "first")


# --- polar_tokenizer.json: the special tokens' strings beside tokenizer.json ----------------------

def test_polar_tokenizer_settings_are_read(tmp_path):
    import json

    d = Path(train_bpe(tmp_path / "custom", specials=("<bos>", "<pad>")))
    (d / "polar_tokenizer.json").write_text(json.dumps(
        {"bos": "<bos>", "pad": "<pad>", "reward_sep": "<sep>", "reward_token": "<score>"}))
    tok = load_tokenizer(str(d))
    lib = tok._served
    assert (tok.bos_id, tok.pad_id) == (lib.token_to_id("<bos>"), lib.token_to_id("<pad>"))
    assert (tok.reward_sep_text, tok.reward_token_text) == ("<sep>", "<score>")
    assert tok.encode_served("x<sep>y<score>").tolist() == \
        [tok.bos_id] + tok.encode("x").tolist() + [tok.reward_sep_id] + tok.encode("y").tolist() \
        + [tok.reward_token_id]
    # through the file path too
    assert load_tokenizer(str(d / "tokenizer.json")).reward_token_text == "<score>"


@pytest.mark.parametrize("content, message", [
    ("{bad", "polar_tokenizer.json: not valid JSON"),
    ("[1]", "must be a JSON object"),
    ('{"bos": 3}', "bos: must be a non-empty token string"),
    ('{"eos": "</s>"}', "eos: unknown key"),
    ('{"bos": "<nope>"}', "no '<nope>'"),
])
def test_bad_polar_tokenizer_settings(tmp_path, content, message):
    d = Path(train_bpe(tmp_path / "bad_settings"))
    (d / "polar_tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_tokenizer(str(d))


@pytest.mark.parametrize("strip", ["lstrip", "rstrip"])
def test_a_literal_that_swallows_whitespace_is_refused(tmp_path, strip):
    # A server would drop the whitespace next to the literal; training keeps it: refused at load.
    import json

    d = Path(train_bpe(tmp_path / strip))
    tree = json.loads((d / "tokenizer.json").read_text())
    for added in tree["added_tokens"]:
        if added["content"] == REWARD_SEP_TEXT:
            added[strip] = True
    (d / "tokenizer.json").write_text(json.dumps(tree))
    with pytest.raises(ValueError, match="differently from the training form"):
        load_tokenizer(str(d))
