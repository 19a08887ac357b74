"""polar.reward without a server (beside the serve tests, whose model fixtures it uses): the
in-process scorer (parity with each item alone, calls from several threads), verl's glue
in-process, and the text handling of the trainer glue."""
import concurrent.futures

import numpy as np
import pytest

from polar import reward
from polar.in_process_scorer import InProcessScorer
from polar.serve.items import StructuredItem, format_structured

from .items_gen import make_items



def test_strip_thinking_as_polars_verl_reward_function():
    # InternLM/POLAR src/polar/reward_func.py: re.search(r"<think>(.*?)</think>(.*)", DOTALL), group 2 stripped
    assert reward.strip_thinking("<think>hm</think>\n\nThe answer is 4.\n") == "The answer is 4."
    assert reward.strip_thinking("<think>a</think>x</think>y ") == "x</think>y"
    assert reward.strip_thinking("no thinking here ") == "no thinking here "
    assert reward.strip_thinking("<think>cut at the length limit ") == "<think>cut at the length limit "


def test_strip_thinking_when_the_chat_template_opened_the_thinking():
    """DeepSeek-R1's and QwQ's chat templates end the generation prompt with `<think>`, so the
    rollout holds only `... </think> answer`: its reasoning was scored, and after 150 lines of it
    the answer fell past the client's truncation (max_response), a right and a wrong answer alike."""
    thinking = "Let me work it out.\n" * 150
    assert reward.strip_thinking(thinking + "</think>\n\nThe answer is 4.\n") == "The answer is 4."
    assert reward.strip_thinking("hm</think>x</think>y ") == "x</think>y"  # up to the first, as with the pair
    assert reward.strip_thinking("reasoning...</think>") == ""


def test_reward_func_refuses_lists_of_different_lengths():
    with pytest.raises(ValueError, match="3 queries, 3 prompts and 1 labels"):
        reward.reward_func(["Q: a"] * 3, ["Q:"] * 3, [" a"], url="http://127.0.0.1:9")


def test_reward_func_refuses_the_empty_label_openrlhf_sends_without_a_label_key():
    with pytest.raises(ValueError, match=r"labels\[1\]: the reference is empty; .*--data\.label_key .*--label_key"):
        reward.reward_func(["Q: a", "Q: b"], ["Q:", "Q:"], ["ref", ""], url="http://127.0.0.1:9")


def test_in_process_scorer_refuses_settings_that_leave_the_prompt_unbounded(scorer, tokenizer):
    with pytest.raises(ValueError, match="max_length >= 8198"):
        InProcessScorer(scorer, tokenizer, max_length=8192, max_response=4096)


def test_verl_items_need_the_prompt():
    with pytest.raises(ValueError, match=r"extra_infos\[1\] has no 'prompt'"):
        reward.compute_score_batch(["d"] * 2, ["a", "b"], ["r", "r"], [{"prompt": "p"}, {}], url="http://127.0.0.1:9")


def test_client_needs_a_url(monkeypatch):
    monkeypatch.delenv(reward.URL_ENV, raising=False)
    with pytest.raises(ValueError, match=reward.URL_ENV):
        reward.RewardClient()


def test_in_process_scorer_equals_each_item_alone(scorer, tokenizer, alone):
    requests = [make_items(50 + i, groups=2, rollouts=3) for i in range(4)]
    expected = [alone([ids for _, ids in format_structured(tokenizer, [StructuredItem(**it) for it in r], 16384, 4096)])
                for r in requests]
    s = InProcessScorer(scorer, tokenizer, max_wait_s=0.05)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(s.score, requests))
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)
        # verl's batch function, scored in-process
        items = requests[0]
        prompts = [it["prompt"] for it in items]
        v = reward.compute_score_batch(["x"] * len(items), ["<think>hm</think>" + it["output"] for it in items],
                                       [it["reference"] for it in items], [{"prompt": p} for p in prompts],
                                       wrapper="sft", scorer=s)
        want = alone([ids for _, ids in format_structured(
            tokenizer, [StructuredItem(it["prompt"], it["reference"], it["output"].strip(), "sft") for it in items],
            16384, 4096)])
        np.testing.assert_allclose(v, want, rtol=0, atol=1e-5)
    finally:
        s.close()


def test_in_process_scorer_counts_what_the_truncation_cut_across_threads(scorer, tokenizer):
    s = InProcessScorer(scorer, tokenizer, max_length=300, max_response=64, max_wait_s=0.01)
    try:
        one = [{"prompt": "p", "reference": "r", "output": "o" * 100}, {"prompt": "q", "reference": "r", "output": "o"}]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(s.score, [one] * 40))
        assert (s.cuts.items, s.cuts.outputs, s.cuts.references, s.cuts.prompts) == (80, 40, 0, 0)
    finally:
        s.close()


@pytest.mark.parametrize("status,header,expected", [
    (429, "3", 3.0), (429, "1000", 8.0), (429, "0", 0.0), (429, "-1", None), (429, "nan", None), (429, "inf", None),
    (429, "soon", None),
    (503, "3", 3.0),  # a gateway's 503 carries it too
    (429, -60, 0.0),  # an HTTP date 60 s ago (made when the test runs): now
    (429, 1000, 8.0),  # a date 1000 s ahead: the wait until it, capped
    (500, "3", None),  # not a status that asks for a wait
])
def test_a_retry_after_is_used_only_when_it_is_a_usable_wait(status, header, expected):
    """A proxy's negative or NaN Retry-After crashed the blocking client (time.sleep refused it); it
    now falls back to the exponential backoff, and a usable one (seconds or an HTTP date, on a 429 or
    a 503) is capped at max_backoff_s."""
    import email.utils
    import time

    import httpx

    if isinstance(header, int):
        header = email.utils.formatdate(time.time() + header, usegmt=True)
    client = reward.RewardClient("http://127.0.0.1:9", backoff_s=0.5, max_backoff_s=8.0)
    wait = client._delay(2, httpx.Response(status, headers={"Retry-After": header}))
    if expected is None:
        assert 0.5 * 2.0 <= wait <= 2.0  # the backoff for attempt 2: 0.5 * 2**2, with jitter in [1/2, 1]
    else:
        assert wait == expected


def test_in_process_scorer_refuses_non_finite_rewards_as_the_server_does(scorer, tokenizer):
    """NaN or inf is not a reward: `polar serve` refuses it (500, naming the items) and the HTTP clients
    raise; the in-process scorer must not hand it to the trainer as one."""
    class Overflowing:
        max_positions = scorer.max_positions

        def score(self, batch):
            rewards = np.array(scorer.score(batch))
            rewards[(batch.tokens == ord("~")).any(dim=1).numpy()] = np.nan
            return rewards

    s = InProcessScorer(Overflowing(), tokenizer, share_prefixes=False, max_wait_s=0.01)
    try:
        items = [{"prompt": "p", "reference": "r", "output": o} for o in ("a", "~", "b")]
        with pytest.raises(ValueError, match=r"non-finite rewards \(nan\) for 1 of the 3 items \(item 1\)"):
            s.score(items)
        with pytest.raises(ValueError, match=r"non-finite rewards \(nan\) for 1 of the 2 items \(text 0\)"):
            s.score_texts(["<|reward|>~[UNUSED_TOKEN_130]", "<|reward|>a[UNUSED_TOKEN_130]"])
        assert all(np.isfinite(s.score(items[:1])))
    finally:
        s.close()
