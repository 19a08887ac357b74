"""The byte tokenizer as a tokenizer.json: polar's HFTokenizer and transformers read texts from it
exactly as ByteTokenizer does (content, served reading, character spans), and a byte-tokenized
engine checkpoint exports with no --tokenizer and scores the same in transformers as in the engine."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from polar.convert.byte_tokenizer import BOS_TEXT, byte_stand_ins, write_byte_tokenizer
from polar.tokenizer import ByteTokenizer, HFTokenizer
from tests.polar.convert.helpers import ROOT

TEXTS = ["hello", "état 数据 😀 <s> </s> [UNUSED_TOKEN_131]", "a<|reward|>b[UNUSED_TOKEN_130]c<|reward|>",
         "  lead space\n\ttabs\r\n", "", "x" * 3000, "\x00\x01\x7f\u00a0\u00ad\ufeff", "<|rew" + "ard|>",
         # the export's BOS and PAD strings typed in a text: a server reads them as those tokens
         "<|polar_bos|>P\n", "P<|polar_pad|>", "<|polar_pad|><|polar_bos|><|polar_bo" + "s|>", "<|polar_pad"]


def _random_texts(n, seed=0):
    rng = np.random.default_rng(seed)
    pool = list("ab <|>[]_\n\té数😀") + ["<|reward|>", "[UNUSED_TOKEN_130]", "\x00", "\u0100", "\U0010ffff",
                                          "<|polar_bos|>", "<|polar_pad|>", "<|polar_"]
    return ["".join(rng.choice(pool, size=int(rng.integers(0, 40)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_byte_tokenizer(tmp_path_factory.mktemp("byte") / "tokenizer")


def test_the_stand_ins_are_the_byte_level_alphabet():
    from tokenizers.pre_tokenizers import ByteLevel

    chars = byte_stand_ins()
    assert sorted(chars) == list(range(256)) and set(chars.values()) == set(ByteLevel.alphabet())
    # and the pre-tokenizer maps every byte of a text to the stand-in of its value
    text = bytes(range(256)).decode("latin-1")
    (piece, _), = ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    assert piece == "".join(chars[b] for b in text.encode("utf-8"))


def test_polar_reads_it_as_the_byte_tokenizer(tok_dir):
    b = ByteTokenizer()
    h = HFTokenizer(tok_dir, bos=BOS_TEXT, pad="<|polar_pad|>")
    assert (h.bos_id, h.pad_id, h.reward_sep_id, h.reward_token_id, h.vocab_size) == (256, 257, 258, 259, 260)
    texts = TEXTS + _random_texts(200)
    for got, want in zip(h.encode_batch(texts), b.encode_batch(texts), strict=True):
        assert got.tolist() == want.tolist()
    for got, want in zip(h.encode_served_batch(texts), b.encode_served_batch(texts), strict=True):
        assert got.tolist() == want.tolist()
    for got, want in zip(h.offsets_batch(texts), b.offsets_batch(texts), strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_transformers_reads_it_as_a_server_does(tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    b = ByteTokenizer()
    texts = TEXTS + _random_texts(100, seed=1)
    assert hf(texts)["input_ids"] == [ids.tolist() for ids in b.encode_served_batch(texts)]
    assert (hf.bos_token_id, hf.pad_token_id) == (b.bos_id, b.pad_id)
    assert hf.decode(b.encode_served(TEXTS[1]), skip_special_tokens=True) == TEXTS[1]


def test_the_clients_strings_through_transformers_are_the_engines(tok_dir):
    """The official client's steps on the export in transformers (tokenize, cut, decode with
    skip_special_tokens, tokenize the string) give the strings and ids polar serve and polar score
    build with ByteTokenizer, BOS and PAD strings typed in the texts included."""
    transformers = pytest.importorskip("transformers")
    from polar.client_format import client_encode_batch
    from tests.polar.test_client_format import fuzz_records, reference_client

    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    records = fuzz_records(300, seed=3)
    for rec, _ in records[::3]:
        rec["prompt"] = f"<|polar_bos|>{rec['prompt'] if isinstance(rec['prompt'], str) else ''}<|polar_pad|>"
    for rec, lengths in records:
        (served,) = client_encode_batch(ByteTokenizer(), [rec], **lengths)
        want = reference_client(lambda t: hf(t)["input_ids"], lambda ids: hf.decode(ids, skip_special_tokens=True),
                                rec, **lengths)
        assert served.text == want, (rec, lengths)
        assert served.ids.tolist() == hf(want)["input_ids"], (rec, lengths)


def test_a_byte_trained_checkpoint_exports_and_scores_the_same_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from engine.inference import RewardScorer
    from engine.packing import collate
    from polar.serve.grouping import ServeGroup

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "tests.polar.serve.make_checkpoint", str(run)], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=600)
    out = tmp_path / "hf"
    # no --tokenizer: the run's config.yaml says it trained on the embedded (byte-tokenized) data
    proc = subprocess.run([sys.executable, "-m", "polar.cli", "convert", "engine-to-hf", str(run / "checkpoints"),
                           str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    texts = ["p\nr<|reward|>p\nyes[UNUSED_TOKEN_130]", "prompt\nréf<|reward|>prompt\nnon[UNUSED_TOKEN_130]",
             "a<|reward|>b[UNUSED_TOKEN_130]", "<|polar_bos|>P\nr<|reward|>P<|polar_pad|>\no[UNUSED_TOKEN_130]"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        hf_rewards = [model(**hf_tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]

    scorer = RewardScorer.load(str(run / "checkpoints"))
    b = ByteTokenizer()
    engine_rewards = []
    for ids in b.encode_served_batch(texts):
        g = ServeGroup(prefix=ids[:-1], candidates=[ids[-1:]], items=[0])
        engine_rewards.append(scorer.score(collate([[g]], len(ids), b.pad_id))[0])
    assert len(set(np.round(engine_rewards, 4))) == len(texts)  # the rewards differ: a comparison of something
    np.testing.assert_allclose(hf_rewards, engine_rewards, rtol=1e-4, atol=1e-5)
