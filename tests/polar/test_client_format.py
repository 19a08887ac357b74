"""polar.client_format against an independent statement of the official client's rules
(POLAR's RewardModelClient._encode), on fuzzed records, for the byte tokenizer and a BPE."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from polar.client_format import Cuts, ScoringItem, client_encode, client_encode_batch, client_texts
from polar.tokenizer import REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, ByteTokenizer, load_tokenizer

from .test_tokenizer import WORDS, train_bpe

TOK = ByteTokenizer()
LITERALS = (REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, "<s>", "</s>")


# --- the reference: the client's steps, written out on a tokenizer given as two functions ----------

def reference_client(tokenize, detokenize, item, max_length=16384, max_response_length=4096):
    """(string, ) the client builds. `tokenize(text)` is `tokenizer(text)["input_ids"]` (with BOS),
    `detokenize(ids)` is `decode(ids, skip_special_tokens=True)`."""
    def flat(v):
        return v if isinstance(v, str) else "\n".join(m["content"] for m in v)

    texts = [flat(item["prompt"]), flat(item["reference"]), flat(item["output"])]
    prompt_ids, ref_ids, out_ids = (list(tokenize(t)) for t in texts)
    if len(ref_ids) > max_response_length:
        ref_ids = ref_ids[:max_response_length]
    if len(out_ids) > max_response_length:
        out_ids = out_ids[:max_response_length]
    room = (max_length - 4 - len(ref_ids) - len(out_ids)) // 2
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[-room:]
    p, r, o = detokenize(prompt_ids), detokenize(ref_ids), detokenize(out_ids)
    glue = "" if item.get("wrapper") == "pretrain" else "\n"
    return p + glue + r + "<|reward|>" + p + glue + o + "[UNUSED_TOKEN_130]"


_BYTE_LITERAL = re.compile("(<\\|reward\\|>|\\[UNUSED_TOKEN_130\\])")


def byte_tokenize(text):
    """The byte tokenizer as a server reads text: BOS 256, bytes, the reward literals 258/259."""
    ids = [256]
    for part in _BYTE_LITERAL.split(text):
        if part == "<|reward|>":
            ids.append(258)
        elif part == "[UNUSED_TOKEN_130]":
            ids.append(259)
        else:
            ids.extend(part.encode("utf-8"))
    return ids


def byte_detokenize(ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# --- fuzzed records ------------------------------------------------------------------------------

PIECES = list(WORDS) + ["é", "日本語", "😀", "🎉", "👩‍👩‍👧", "ñ", "\n", " ", "\t", "?", "<|rew",
                        "[UNUSED_TOKEN_13", "ard|>"] + list(LITERALS) * 3


def fuzz_text(rng):
    if rng.random() < 0.12:
        return ""
    n = int(rng.integers(1, 14))
    return "".join(str(rng.choice(PIECES)) + str(rng.choice(["", " ", "\n"])) for _ in range(n))


def fuzz_value(rng, role):
    if rng.random() < 0.25:
        k = int(rng.integers(0, 4))
        return [{"role": role, "content": fuzz_text(rng)} for _ in range(k)]
    return fuzz_text(rng)


def fuzz_records(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rec = {"prompt": fuzz_value(rng, "user"), "reference": fuzz_value(rng, "assistant"),
               "output": fuzz_value(rng, "assistant")}
        if rng.random() < 0.5:
            rec["wrapper"] = "pretrain" if rng.random() < 0.4 else "sft"
        if rng.random() < 0.8:  # tiny limits: cuts everywhere, budgets down to negative
            lengths = dict(max_length=int(rng.integers(0, 70)),
                           max_response_length=int(rng.integers(0, 16)))
        else:
            lengths = dict(max_length=16384, max_response_length=4096)
        out.append((rec, lengths))
    return out


def check_against_reference(tok, tokenize, detokenize, records):
    """Every record's string and ids equal the reference's; returns the strings."""
    texts = []
    by_lengths = {}
    for k, (rec, lengths) in enumerate(records):
        by_lengths.setdefault(tuple(sorted(lengths.items())), []).append(k)
    got = [None] * len(records)
    for key, ks in by_lengths.items():  # the batch API, one call per length setting
        for k, s in zip(ks, client_encode_batch(tok, [records[k][0] for k in ks], **dict(key))):
            got[k] = s
    for (rec, lengths), served in zip(records, got):
        want = reference_client(tokenize, detokenize, rec, **lengths)
        assert served.text == want, (rec, lengths)
        assert served.ids.dtype == np.int32
        assert served.ids.tolist() == list(tokenize(want)), (rec, lengths)
        texts.append(want)
    return texts


def coverage(records, texts):
    """What the fuzz reached: a test that never cuts a character or drops a literal proves little."""
    seen = {"fffd": 0, "literal_in": 0, "empty_out": 0, "negative_budget": 0, "lists": 0}
    for (rec, lengths), text in zip(records, texts):
        seen["fffd"] += "\ufffd" in text
        seen["literal_in"] += any(lit in json.dumps(rec, ensure_ascii=False) for lit in LITERALS)
        seen["empty_out"] += rec["output"] in ("", [])
        seen["negative_budget"] += lengths["max_length"] < 4 + 2 * lengths["max_response_length"]
        seen["lists"] += any(isinstance(rec[f], list) for f in ("prompt", "reference", "output"))
    return seen


def test_byte_tokenizer_matches_the_reference_on_fuzzed_records():
    records = fuzz_records(1500, seed=0)
    texts = check_against_reference(TOK, byte_tokenize, byte_detokenize, records)
    seen = coverage(records, texts)
    assert min(seen.values()) >= 30, seen


# --- a BPE from the HF tokenizers library, and transformers on the same file -----------------------

@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """The test BPE with a post-processor that adds <s>, as InternLM2's tokenizer does."""
    from tokenizers import Tokenizer as Lib, processors

    d = Path(train_bpe(tmp_path_factory.mktemp("client_bpe")))
    lib = Lib.from_file(str(d / "tokenizer.json"))
    lib.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", lib.token_to_id("<s>"))])
    lib.save(str(d / "tokenizer.json"))
    return d


def test_bpe_matches_the_reference_on_fuzzed_records(bpe_dir):
    from tokenizers import Tokenizer as Lib

    lib = Lib.from_file(str(bpe_dir / "tokenizer.json"))  # as the server loads it
    tokenize = lambda text: lib.encode(text).ids  # noqa: E731
    detokenize = lambda ids: lib.decode(ids, skip_special_tokens=True)  # noqa: E731
    records = fuzz_records(1200, seed=1)
    texts = check_against_reference(load_tokenizer(str(bpe_dir)), tokenize, detokenize, records)
    seen = coverage(records, texts)
    assert min(seen.values()) >= 30, seen


def test_transformers_tokenizer_gives_the_same(bpe_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(bpe_dir / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
        pad_token="</s>", additional_special_tokens=[REWARD_SEP_TEXT, REWARD_TOKEN_TEXT],
        clean_up_tokenization_spaces=False)
    tokenize = lambda text: hf(text)["input_ids"]  # noqa: E731
    detokenize = lambda ids: hf.decode(ids, skip_special_tokens=True)  # noqa: E731
    records = fuzz_records(1000, seed=2)
    check_against_reference(load_tokenizer(str(bpe_dir)), tokenize, detokenize, records)


# --- hand-worked cases of each rule (byte tokenizer) -----------------------------------------------

def test_empty_responses_keep_their_newline_and_are_scored():
    s = client_encode(TOK, "p", "", "")
    assert s.text == "p\n<|reward|>p\n[UNUSED_TOKEN_130]"
    assert s.ids.tolist() == [256] + list(b"p\n") + [258] + list(b"p\n") + [259]
    assert client_encode(TOK, "p", "", "", "pretrain").text == "p<|reward|>p[UNUSED_TOKEN_130]"


def test_response_keeps_max_response_length_minus_one_bytes():
    # BOS counts: 4 ids kept = BOS + "abc"
    assert client_encode(TOK, "p", "abcdef", "xy", max_response_length=4).text == \
        "p\nabc<|reward|>p\nxy[UNUSED_TOKEN_130]"


def test_prompt_budget_counts_both_bos():
    # |ref ids| = 3, |out ids| = 3: budget (20 - 4 - 3 - 3) // 2 = 5 ids = BOS dropped, last 5 bytes
    assert client_encode(TOK, "0123456789", "ab", "cd", max_length=20).text == \
        "56789\nab<|reward|>56789\ncd[UNUSED_TOKEN_130]"


def test_unguarded_budgets():
    # budget (10 - 4 - 3 - 3) // 2 = 0: ids[-0:] keeps the whole prompt
    assert client_encode(TOK, "0123", "ab", "cd", max_length=10).text.startswith("0123\nab")
    # budget (8 - 4 - 3 - 3) // 2 = -1: ids[1:] drops BOS only; -2 drops BOS and "0"
    assert client_encode(TOK, "0123", "ab", "cd", max_length=8).text.startswith("0123\nab")
    assert client_encode(TOK, "0123", "ab", "cd", max_length=6).text.startswith("123\nab")


def test_literals_typed_in_text_vanish_and_cuts_leave_replacement_chars():
    s = client_encode(TOK, f"a{REWARD_SEP_TEXT}b", f"r{REWARD_TOKEN_TEXT}", "😀x",
                      max_response_length=3)
    # the emoji's first 2 of 4 bytes are kept (BOS + 2): one U+FFFD
    assert s.text == "ab\nr<|reward|>ab\n\ufffd[UNUSED_TOKEN_130]"
    # the ids have exactly the structural specials
    assert [i for i in s.ids.tolist() if i >= 256] == [256, 258, 259]


def test_message_lists_and_items():
    msgs = [{"role": "user", "content": "q1"}, {"role": "user", "content": "q2"}]
    a = client_texts(TOK, [{"prompt": msgs, "reference": "r", "output": "o"},
                           ScoringItem("q1\nq2", "r", "o", "sft")])
    assert a == ["q1\nq2\nr<|reward|>q1\nq2\no[UNUSED_TOKEN_130]"] * 2
    assert client_texts(TOK, []) == []


def test_bad_items():
    with pytest.raises(ValueError, match="item 0: output: missing"):
        client_texts(TOK, [{"prompt": "p", "reference": "r"}])
    with pytest.raises(ValueError, match="item 1: wrapper"):
        client_texts(TOK, [{"prompt": "p", "reference": "r", "output": "o"},
                           {"prompt": "p", "reference": "r", "output": "o", "wrapper": "chat"}])
    with pytest.raises(TypeError, match="item 0: reference: message 0"):
        client_texts(TOK, [{"prompt": "p", "reference": [{"role": "x"}], "output": "o"}])
    with pytest.raises(TypeError, match="item 0: expected a dict"):
        client_texts(TOK, ["p"])
    with pytest.raises(ValueError, match="max_length"):
        client_texts(TOK, [], max_length=-1)


def test_cuts_count_what_the_truncation_drops_across_calls():
    cuts = Cuts()
    # ids: BOS + 6 bytes > 4 kept: the reference is cut; the output ("xy", 3 ids) is not
    client_encode(TOK, "p", "abcdef", "xy", max_response_length=4, cuts=cuts)
    assert (cuts.items, cuts.outputs, cuts.references, cuts.prompts) == (1, 0, 1, 0)
    # every response is past 2 ids; budget (20 - 4 - 2 - 2) // 2 = 6 of the first prompt's 11 ids
    client_texts(TOK, [{"prompt": "0123456789", "reference": "ab", "output": "cd"},
                       {"prompt": "q", "reference": "abc", "output": "cde"}],
                 max_length=20, max_response_length=2, cuts=cuts)
    assert (cuts.items, cuts.outputs, cuts.references, cuts.prompts) == (3, 2, 3, 1)
    assert str(cuts) == "2 output(s), 3 reference(s) and 1 prompt(s) of 3 item(s)"


def test_a_prompt_losing_only_its_bos_is_not_cut():
    cuts = Cuts()
    # budget (20 - 4 - 3 - 3) // 2 = 5 ids of BOS + "01234": the BOS goes, the text stays whole
    assert client_encode(TOK, "01234", "ab", "cd", max_length=20, cuts=cuts).text.startswith("01234\nab")
    # budget 0 keeps the whole prompt; -1 drops the BOS only; -2 drops "0" too
    for max_length in (10, 8):
        client_encode(TOK, "0123", "ab", "cd", max_length=max_length, cuts=cuts)
    assert (cuts.items, cuts.outputs, cuts.references, cuts.prompts) == (3, 0, 0, 0)
    client_encode(TOK, "0123", "ab", "cd", max_length=6, cuts=cuts)
    assert cuts.prompts == 1


def test_cuts_agree_with_the_reference_on_fuzzed_records():
    records = fuzz_records(600, seed=3)
    seen = Cuts()
    for rec, lengths in records:
        cuts = Cuts()
        served = client_encode_batch(TOK, [rec], cuts=cuts, **lengths)[0]
        flat = [v if isinstance(v, str) else "\n".join(m["content"] for m in v)
                for v in (rec["prompt"], rec["reference"], rec["output"])]
        p, r, o = (byte_tokenize(t) for t in flat)
        mr = lengths["max_response_length"]
        room = (lengths["max_length"] - 4 - min(len(r), mr) - min(len(o), mr)) // 2
        kept = p[-room:] if len(p) > room else p
        assert (cuts.items, cuts.references, cuts.outputs) == (1, len(r) > mr, len(o) > mr), (rec, lengths)
        # text lost: more than the BOS went from the prompt's start
        assert cuts.prompts == (len(kept) < len(p) - 1), (rec, lengths, served.text)
        seen.outputs += cuts.outputs
        seen.references += cuts.references
        seen.prompts += cuts.prompts
    # both outcomes reached, for each count
    assert all(0 < n < len(records) for n in (seen.outputs, seen.references, seen.prompts)), seen
