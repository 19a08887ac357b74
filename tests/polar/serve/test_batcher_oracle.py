"""Served rewards against the oracle: the reward of (prompt, reference, candidate) is a plain
transformers forward of that one sequence, the official client's string (POLAR paper, arXiv
2507.05197: prompt + reference + <|reward|> + prompt + candidate), whatever the batching; and a
non-finite item fails only its own request, named alone."""
from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
import torch

from polar.in_process_scorer import InProcessScorer

from .conftest import ROOT, live_server
from .test_app_failures import _until, held_rounds

P = "Solve step by step: what is 2 + 2? Answer in one word, état 数据 😀 please."
R = "The answer is 4; four."


@pytest.fixture(scope="module")
def oracle(checkpoint_dir, tmp_path_factory):
    """(item, max_length, max_response) -> the transformers reward of the client's string, from the
    checkpoint exported by `polar convert engine-to-hf`."""
    transformers = pytest.importorskip("transformers")
    from tests.polar.test_client_format import reference_client

    out = tmp_path_factory.mktemp("oracle") / "hf"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "polar.cli", "convert", "engine-to-hf",
                           os.path.join(checkpoint_dir, "checkpoints"), str(out)],
                          cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()

    def reward(item, max_length=16384, max_response=4096):
        text = reference_client(lambda t: tok(t)["input_ids"], lambda ids: tok.decode(ids, skip_special_tokens=True),
                                item, max_length, max_response)
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt")).logits[0, 0].item()

    return reward


def test_served_rewards_equal_transformers_whatever_the_batching(scorer, tokenizer, oracle):
    """n candidates of one prompt (empty, duplicate, unicode, one alone), several prompts in one
    request, a reference past --max-response (cut as the client cuts it), concurrent requests split
    over rounds and forwards (small --max-batch-tokens and --row-tokens), the text endpoints, and
    the in-process scorer."""
    outs = ["4", "", "four 😀", "4", "x" * 60, R, "\n"]
    items = [{"prompt": P, "reference": R, "output": o} for o in outs]
    items += [{"prompt": "other prompt " * 8, "reference": "long reference " * 40, "output": "z" * 90},
              {"prompt": [{"role": "user", "content": "hi"}], "reference": "ref", "output": "o", "wrapper": "pretrain"}]
    lengths = dict(max_length=400, max_response=120)
    want = np.array([oracle(it, *lengths.values()) for it in items])
    assert len(set(np.round(want, 4))) == len(set(map(str, items)))  # distinct items, distinct rewards
    batches = []

    def recorded(batch):
        batches.append(batch)
        return scorer.score(batch)

    with live_server(scorer, tokenizer, score=recorded, batcher_kw=dict(max_batch_tokens=512, row_tokens=256),
                     **lengths) as (url, _):
        post = lambda path, body: httpx.post(f"{url}{path}", json=body, timeout=120).json()  # noqa: E731
        got = [d["reward"] for d in post("/v1/rewards", {"items": items})["data"]]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        # one round in several forwards, rows holding several candidates (a shared prefix, groups packed)
        assert len(batches) > 1 and max(b.reward_index.numel() - b.tokens.shape[0] for b in batches) > 0
        grouped = post("/v1/rewards", {"items": [{"prompt": P, "reference": R, "outputs": outs}]})["data"][0]
        np.testing.assert_allclose(grouped["rewards"], want[:len(outs)], rtol=0, atol=1e-5)
        got = post("/get_reward", {"query": [P + o for o in outs], "prompts": [P] * len(outs),
                                   "labels": [R] * len(outs)})["rewards"]
        np.testing.assert_allclose(got, want[:len(outs)], rtol=0, atol=1e-5)

        def alone(k):  # each item its own request, 48 requests from 12 threads
            return post("/v1/rewards", {"items": [items[k % len(items)]]})["data"][0]["reward"]

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            got = list(pool.map(alone, range(48)))
        np.testing.assert_allclose(got, [want[k % len(items)] for k in range(48)], rtol=0, atol=1e-5)
        texts = [f"{P}\n{R}<|reward|>{P}\n{o}[UNUSED_TOKEN_130]" for o in outs]  # nothing cut: the client's strings
        got = [e["embedding"][0] for e in post("/classify", {"text": texts})]
        np.testing.assert_allclose(got, want[:len(outs)], rtol=0, atol=1e-5)
    in_process = InProcessScorer(scorer, tokenizer, max_length=400, max_response=120, max_batch_tokens=512,
                                 row_tokens=256)
    try:
        np.testing.assert_allclose(in_process.score(items), want, rtol=0, atol=1e-5)
    finally:
        in_process.close()


@pytest.fixture(scope="module")
def broken_scorer(checkpoint_dir):
    """The serve tests' model with byte 7's embedding NaN: every input holding it gets a NaN reward,
    as an input that overflows the model's precision does."""
    from engine.inference import RewardScorer

    scorer = RewardScorer.load(checkpoint_dir)
    weights = dict(scorer.chunk.named_parameters())["backbone.embedding.word_embeddings.weight"]
    with torch.no_grad():
        weights[7] = float("nan")
    return scorer


def test_a_non_finite_item_fails_its_request_alone(broken_scorer, tokenizer, alone):
    """A NaN reached every item of its packed row (masked attention weights are zeros, 0 * NaN is
    NaN): its siblings of one prompt were named with it, and another request packed beside it
    was answered 500 though each of its items alone is finite."""
    gate, rounds, held = held_rounds(broken_scorer)
    bad = {"items": [{"prompt": P, "reference": R, "outputs": ["4", "bell\x07", "four"]}]}
    good = {"items": [{"prompt": "another prompt", "reference": "ref", "output": "fine"}]}
    with live_server(broken_scorer, tokenizer, score=held) as (url, service):
        answers = {}

        def post(key, body):
            answers[key] = httpx.post(f"{url}/v1/rewards", json=body, timeout=120)

        threads = [threading.Thread(target=post, args=(k, b)) for k, b in (("held", good), ("bad", bad))]
        threads[0].start()
        assert _until(lambda: rounds)  # its round holds the worker while the others queue
        threads[1].start()
        assert _until(lambda: service.batcher.queued_items == 3)
        threads.append(threading.Thread(target=post, args=("good", good)))
        threads[-1].start()
        assert _until(lambda: service.batcher.queued_items == 4)
        gate.set()
        for t in threads:
            t.join(120)
        assert len(rounds) >= 2 and rounds[1].tokens.shape[0] == 1  # one packed row held both requests
        from polar.serve.items import StructuredItem, format_structured

        (_, ids), = format_structured(tokenizer, [StructuredItem("another prompt", "ref", "fine")], 16384, 4096)
        for key in ("held", "good"):
            assert answers[key].status_code == 200, answers[key].text
            np.testing.assert_allclose(answers[key].json()["data"][0]["reward"], alone([ids])[0], atol=1e-5)
        assert answers["bad"].status_code == 500
        message = answers["bad"].json()["error"]["message"]
        assert "for 1 of the 3 items (items[0] (outputs[1]))" in message, message
