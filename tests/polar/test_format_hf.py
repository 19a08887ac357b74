"""polar.format with real Hugging Face tokenizers: BPE merges across the prefix/candidate boundary,
truncation at token boundaries, literals kept as text, post-processors that trim offsets, truncation on
slices of long texts, and transformers' AutoTokenizer as the oracle of the ids (tests/polar/test_format.py
holds the byte tokenizer's hand-worked cases)."""
from pathlib import Path

import numpy as np
import pytest

from polar.format import as_text, build_text, encode_group, encode_groups, prompt_budget
from polar.tokenizer import REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, ByteTokenizer, HFTokenizer, load_tokenizer

from .test_format import LITERALS, TOK, check_split, full_ids, random_groups, random_text
from .test_tokenizer import WORDS, train_bpe


# --- a real HF tokenizer, with merges across the prefix/candidate boundary -------------------------

@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return load_tokenizer(train_bpe(tmp_path_factory.mktemp("bpe_format")))


def test_the_bpe_merges_across_piece_boundaries(bpe):
    # The premise of the tests below: pieces tokenized one by one differ from the whole string.
    whole = bpe.encode("why?\nthe cat").tolist()
    pieces = bpe.encode("why?").tolist() + bpe.encode("\n").tolist() + bpe.encode("the cat").tolist()
    assert whole != pieces and len(whole) < len(pieces)


@pytest.mark.parametrize("seed", [0, 1])
def test_hf_shared_prefix_changes_no_token(bpe, seed):
    groups = random_groups(150, seed=seed)
    batch = encode_groups(bpe, [g[0] for g in groups], [g[1] for g in groups],
                          [g[2] for g in groups], wrapper=[g[3] for g in groups])
    per_piece_differs = 0
    for (p, r, cs, w), got in zip(groups, batch):
        fulls = [full_ids(p, r, c, w, tok=bpe) for c in cs]
        check_split(got, fulls)
        for c, f in zip(cs, fulls):
            # the serving form ends with the literal reward token, read as its id
            text = build_text(p, r, c, w)[:-len(REWARD_TOKEN_TEXT)]
            assert f == bpe.encode_served(text).tolist() + [bpe.reward_token_id]
            # pieces tokenized one by one would have given other ids
            pt, rt, ct = as_text(p), as_text(r), as_text(c)
            nl = "\n" if w == "sft" else ""
            ref_side = [pt, nl if rt else "", rt]
            out_side = [pt, nl if ct else "", ct]
            old = ([bpe.bos_id] + [i for x in ref_side for i in bpe.encode(x).tolist()]
                   + [bpe.reward_sep_id] + [i for x in out_side for i in bpe.encode(x).tolist()])
            per_piece_differs += old + [bpe.reward_token_id] != f
    assert per_piece_differs > len(groups) // 2


def test_hf_truncation_cuts_at_token_boundaries(bpe):
    rng = np.random.default_rng(3)
    for _ in range(60):
        p = random_text(rng, max_words=20, newlines=False)
        r = random_text(rng, max_words=12, newlines=False)
        cs = [random_text(rng, max_words=12, newlines=False) for _ in range(2)]
        max_response = int(rng.integers(0, 8))
        max_length = int(rng.integers(4, 40))
        g = encode_group(bpe, p, r, cs, max_length=max_length, max_response=max_response)
        spans = dict(zip(["p", "r", "c0", "c1"], bpe.offsets_batch([p, r, *cs])))

        limit = max(0, max_response - 1)  # the first max_response ids of BOS + text

        def head(text, sp):  # the kept text, and its length counted with its BOS
            if len(sp) <= limit:
                return text, min(1 + len(sp), max_response)
            return (text[:sp[limit, 0]] if limit else "", max_response)

        r_kept, r_n = head(r, spans["r"])
        kept = [head(c, spans[f"c{i}"]) for i, c in enumerate(cs)]
        budget = prompt_budget(max_length, r_n, max(n for _, n in kept))
        sp = spans["p"]
        p_kept = p if len(sp) <= budget else (p[sp[len(sp) - budget - 1, 1]:] if budget else "")
        for i, (c_kept, _) in enumerate(kept):
            assert g.full(i).tolist() == full_ids(p_kept, r_kept, c_kept, tok=bpe)


def test_custom_reward_strings_reach_the_text(tmp_path):
    tok = HFTokenizer(train_bpe(tmp_path, specials=("<s>", "</s>")), reward_sep="<sep>",
                      reward_token="<score>")
    g = encode_group(tok, "why the cat?", "the cat sat", ["the dog sat", "a dog"])
    for i, c in enumerate(["the dog sat", "a dog"]):
        assert tok.decode(g.full(i)) == f"why the cat?\nthe cat sat<sep>why the cat?\n{c}<score>"
    check_split(g, [full_ids("why the cat?", "the cat sat", c, tok=tok)
                    for c in ["the dog sat", "a dog"]])


# --- text is content, never structure (tests/polar/test_format.py: the byte tokenizer's case) --------

def test_literals_in_texts_stay_text_with_a_bpe(bpe):
    rng = np.random.default_rng(5)
    specials = {bpe.bos_id, bpe.pad_id, bpe.reward_sep_id, bpe.reward_token_id}
    for _ in range(100):
        def text():
            words = [str(w) for w in rng.choice(list(WORDS) + list(LITERALS), size=6)]
            return "".join(w + str(rng.choice(["", " ", "\n"])) for w in words)
        p, r, cs = text(), text(), [text(), text()]
        w = "sft" if rng.random() < 0.5 else "pretrain"
        g = encode_group(bpe, p, r, cs, wrapper=w)
        for i, c in enumerate(cs):
            ids = g.full(i).tolist()
            # the only special ids are the structural ones, at their places
            where = [k for k, t in enumerate(ids) if t in specials]
            assert [ids[k] for k in where] == [bpe.bos_id, bpe.reward_sep_id, bpe.reward_token_id]
            assert where[0] == 0 and where[2] == len(ids) - 1
            # and the text reads back whole: the literals are there, as text
            assert bpe.decode(ids) == build_text(p, r, c, w)


# --- a post-processor that trims offsets ------------------------------------------------------------

def test_trimmed_offsets_cut_exactly(tmp_path):
    """A ByteLevel post-processor with trim_offsets moves a token's start past its leading space;
    a head cut there kept that space, which re-tokenized as one token more than max_response."""
    from tokenizers import Tokenizer as Lib, processors

    plain_dir = Path(train_bpe(tmp_path / "plain", merge_across_spaces=False))
    lib = Lib.from_file(str(plain_dir / "tokenizer.json"))
    lib.post_processor = processors.ByteLevel(trim_offsets=True)
    (tmp_path / "trim").mkdir()
    lib.save(str(tmp_path / "trim" / "tokenizer.json"))
    plain, trim = load_tokenizer(str(plain_dir)), load_tokenizer(str(tmp_path / "trim"))
    text = "the cat sat on the mat and the dog ran to the answer " * 3
    for max_response in range(1, 25):
        g = encode_group(trim, "why?", text, ["the cat"], max_length=4096, max_response=max_response)
        kept = trim.decode(g.full(0)).split(REWARD_SEP_TEXT)[0].removeprefix("why?").removeprefix("\n")
        assert len(trim.encode(kept)) <= max_response - 1  # its BOS is the other id
    for max_length in range(8, 60, 3):  # the prompt's tail cut too
        args = (text, "the dog", ["the cat", "a dog"], "sft", max_length, 5)
        g, want = encode_group(trim, *args), encode_group(plain, *args)
        assert [g.full(i).tolist() for i in range(2)] == [want.full(i).tolist() for i in range(2)]


# --- truncation reads slices of long texts -------------------------------------------------------

def long_groups(rng, n):
    """Texts of thousands of tokens: multi-byte characters, newlines, long runs."""
    def text():
        parts = [random_text(rng, max_words=40) for _ in range(int(rng.integers(1, 80)))]
        if rng.random() < 0.3:
            parts.insert(int(rng.integers(0, len(parts))), str(rng.choice(["é", "😀", " ", "x"])) * 3000)
        return " ".join(parts)

    return [(text(), text(), [text() for _ in range(int(rng.integers(1, 4)))],
             "sft" if rng.random() < 0.7 else "pretrain") for _ in range(n)]


@pytest.mark.parametrize("kind,chars_per_token,margin", [("byte", 8, 64), ("bpe", 8, 64), ("bpe", 1, 64),
                                                           ("bpe", 2, 0)])
def test_cuts_on_slices_equal_cuts_on_whole_texts(kind, chars_per_token, margin, bpe, monkeypatch):
    """Offsets are computed on a slice of each long text; a slice too short or cut too near the
    tokens wanted (small settings force both) falls back to the whole text: the same groups."""
    import types

    import polar.tokenizer as tokenizer_module
    from polar.tokenizer import Tokenizer

    monkeypatch.setattr(tokenizer_module, "_EDGE_CHARS_PER_TOKEN", chars_per_token)
    monkeypatch.setattr(tokenizer_module, "_EDGE_MARGIN", margin)
    tok = TOK if kind == "byte" else bpe
    whole = ByteTokenizer() if kind == "byte" else load_tokenizer(str(bpe.path.parent))
    whole.edge_offsets_batch = types.MethodType(Tokenizer.edge_offsets_batch, whole)  # reads whole texts
    groups = long_groups(np.random.default_rng(7), 20)
    args = ([g[0] for g in groups], [g[1] for g in groups], [g[2] for g in groups], [g[3] for g in groups])
    for max_length, max_response, cap in ((16384, 4096, 0), (3000, 700, 2500), (40, 9, 0)):
        got = encode_groups(tok, *args, max_length=max_length, max_response=max_response, group_capacity=cap)
        want = encode_groups(whole, *args, max_length=max_length, max_response=max_response, group_capacity=cap)
        for a, b, (_, _, cs, _) in zip(got, want, groups, strict=True):
            assert all(np.array_equal(a.full(i), b.full(i)) for i in range(len(cs)))
            assert a.prompt_cut_to_fit == b.prompt_cut_to_fit


# --- transformers' AutoTokenizer as the oracle of the ids -----------------------------------------

ORACLE_TEXTS = ["", " ", "  a  b   c  ", "\t\tx\t", "\n\nfoo\n\n", "trailing   ", "e\u0301 n\u0303 a\u030a",
                "👋🏽 👨\u200d👩\u200d👧 🇫🇷", "日本語のテキスト", "שלום مرحبا", "\u200bzero\u200dwidth\ufeff",
                "ﬁ Ｆｕｌｌ\u00a0nbsp", "the cat sat", "the cat ran", "12345 naïve"]


def _family(directory, kind):
    """tokenizer.json files of other families (no tokenizer_config.json: transformers reads the file as
    it is): Llama-3's byte-level BPE with a BOS template, Qwen2's (NFC, no BOS), and SentencePiece-style
    BPEs (byte fallback) as Llama-2's legacy normalizer or as a Metaspace that marks the first piece."""
    import json

    from tokenizers import Tokenizer as Lib, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>", REWARD_SEP_TEXT, REWARD_TOKEN_TEXT]
    template = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    if kind in ("llama3", "qwen2"):
        lib = Lib(models.BPE())
        lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        lib = Lib(models.BPE(unk_token="<unk>"))
        lib.pre_tokenizer = pre_tokenizers.Metaspace()
        alphabet = []
    lib.train_from_iterator(ORACLE_TEXTS * 3 + [" ".join(WORDS)] * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=alphabet, show_progress=False))
    tree = json.loads(lib.to_str())
    if kind == "llama3":
        tree["post_processor"] = template
    elif kind == "qwen2":
        tree["normalizer"] = {"type": "NFC"}
        tree["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                                  "use_regex": True}
    else:
        vocab = tree["model"]["vocab"]
        vocab.update({f"<0x{i:02X}>": len(vocab) + i for i in range(256)})
        tree["model"].update(byte_fallback=True, fuse_unk=True)
        tree["post_processor"] = template
        if kind == "llama2":
            tree["pre_tokenizer"] = None
            tree["normalizer"] = {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        else:
            tree["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                                     "split": False}
    directory.mkdir(parents=True)
    (directory / "tokenizer.json").write_text(json.dumps(tree))
    return directory


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "llama2", "metaspace_first"])
def test_group_ids_are_what_transformers_gives_the_serving_string(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    d = _family(tmp_path / kind, kind)
    tok, hf = load_tokenizer(str(d)), transformers.AutoTokenizer.from_pretrained(str(d))
    rng = np.random.default_rng(0)
    for wrapper in ("sft", "pretrain"):
        prompts, refs, cands = [], [], []
        for _ in range(12):
            prompts.append(rng.choice(ORACLE_TEXTS))
            refs.append(rng.choice(ORACLE_TEXTS))
            first = str(rng.choice(ORACLE_TEXTS))
            cands.append([first, first + " more", str(rng.choice(ORACLE_TEXTS)), ""])
        for g, p, r, cs in zip(encode_groups(tok, prompts, refs, cands, wrapper), prompts, refs, cands, strict=True):
            for i, c in enumerate(cs):
                served = hf(build_text(p, r, c, wrapper), add_special_tokens=False)["input_ids"]
                assert g.full(i).tolist() == [tok.bos_id] + served, (kind, wrapper, p, r, c)
    for text in ORACLE_TEXTS + [f"a {REWARD_SEP_TEXT}b<s>{REWARD_TOKEN_TEXT}"]:
        assert tok.encode(text).tolist() == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
