"""The model's positions bound what the server takes: with dynamic RoPE (POLAR-7B's) the engine
refuses a packed row wider than max_position_embeddings, so rows stay within it, padding included,
and an item longer than it gets 413 alone while the requests batched with it are scored."""
import threading

import httpx
import numpy as np

from .conftest import DYNAMIC_POSITIONS, live_server


def test_packed_rows_of_short_items_stay_within_the_positions(dynamic_scorer, tokenizer, alone_dynamic):
    texts = [f"prompt number {i} and some words\nref<|reward|>prompt number {i}\nout[UNUSED_TOKEN_130]"
             for i in range(12)]
    ids = tokenizer.encode_served_batch(texts)
    assert max(len(a) for a in ids) < DYNAMIC_POSITIONS < sum(len(a) for a in ids)
    # row_tokens above the positions, and 250 + 16-padding rounding above them too
    kw = dict(pack_rows=True, row_tokens=1024, pad_multiple=96)
    with live_server(dynamic_scorer, tokenizer, batcher_kw=kw) as (url, service):
        res = httpx.post(f"{url}/classify", json={"text": texts}, timeout=60)
        assert res.status_code == 200, res.text
        np.testing.assert_allclose([e["embedding"][0] for e in res.json()], alone_dynamic(ids), rtol=0, atol=1e-5)
        assert service.batcher.row_tokens == DYNAMIC_POSITIONS


def test_an_item_longer_than_the_positions_gets_413_and_its_round_mates_200(dynamic_scorer, tokenizer,
                                                                            alone_dynamic):
    small = ["p\nr<|reward|>p\no[UNUSED_TOKEN_130]"]
    big = ["x" * 300 + "[UNUSED_TOKEN_130]"]
    answers = {}
    with live_server(dynamic_scorer, tokenizer, batcher_kw=dict(max_wait_s=0.3)) as (url, _):
        def post(name, body, path="/classify"):
            answers[name] = httpx.post(f"{url}{path}", json=body, timeout=60)

        threads = [threading.Thread(target=post, args=a) for a in (
            ("small", {"text": small}), ("big", {"text": big}),
            ("structured", {"items": [{"prompt": "p", "reference": "r", "output": "o" * 300}]}, "/v1/rewards"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert answers["small"].status_code == 200
    np.testing.assert_allclose(answers["small"].json()[0]["embedding"][0],
                               alone_dynamic(tokenizer.encode_served_batch(small))[0], rtol=0, atol=1e-5)
    for name, where in (("big", "text[0] is 302 tokens long"), ("structured", "items[0] is")):
        message = answers[name].json()["error"]["message"]
        assert answers[name].status_code == 413 and where in message, message
        assert f"the model's {DYNAMIC_POSITIONS} positions" in message


def test_a_structured_item_past_the_positions_is_named_as_a_whole(dynamic_scorer, tokenizer):
    """The long part may be the prompt or the reference, not the output: the message names the
    item (and which of its outputs), not a field that may be short."""
    with live_server(dynamic_scorer, tokenizer) as (url, _):
        cases = (({"items": [{"prompt": "p", "reference": "r", "output": "o"},
                             {"prompt": "p" * 300, "reference": "r", "output": "o"}]}, "items[1] is"),
                 ({"items": [{"prompt": "p", "reference": "r" * 300, "outputs": ["a", "b"]}]},
                  "items[0] (outputs[0]) is"))
        for body, where in cases:
            res = httpx.post(f"{url}/v1/rewards", json=body, timeout=60)
            message = res.json()["error"]["message"]
            assert res.status_code == 413 and message.startswith(where), message
            assert ".output" not in message and "--max-length" in message
