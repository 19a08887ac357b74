"""polar/reward.py's compute_score_async, awaited as verl's reward loop awaits an `async def` custom reward
function, against `polar serve` on loopback (the serve tests' small real model) and the in-process scorer:
many responses at once, rewards equal to compute_score's, one event loop after another, and the refusals."""
import asyncio
import functools
import importlib.util
import inspect
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from polar import reward
from polar.in_process_scorer import InProcessScorer

from .conftest import live_server

NOWHERE = "http://127.0.0.1:9"  # the refusals come before any request


def _custom_reward_fn(name: str, reward_kwargs: dict):
    """verl's get_custom_reward_fn (verl/trainer/ppo/reward.py; volcengine/verl
    b178a3cd56f58b2d502255daba591e92833930a7): custom_reward_function.path loaded as a module of its own
    ("custom_module_<hash>"), `name` taken from it, and a coroutine function wrapped as
    partial(_call_with_kwargs_async, raw_fn, reward_kwargs), whose reward_kwargs win over the call's."""
    spec = importlib.util.spec_from_file_location(f"custom_module_{hash(os.path.abspath(reward.__file__))}",
                                                  reward.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    raw_fn = getattr(module, name)
    assert inspect.iscoroutinefunction(raw_fn), f"{name} loaded by its path is not a coroutine function"
    # the installed module's function: its clients are those of code importing polar.reward (one per URL)
    assert raw_fn is getattr(reward, name)

    async def _call_with_kwargs_async(raw_fn, extra_kwargs, *args, **kwargs):
        return await raw_fn(*args, **{**kwargs, **extra_kwargs})

    return functools.partial(_call_with_kwargs_async, raw_fn, reward_kwargs)


async def _reward_loop(compute_score, samples, reward_router_address=None) -> list[dict]:
    """verl's RewardLoopWorker.compute_score_batch (verl/experimental/reward_loop/reward_loop.py, a task per
    sample, gathered) running NaiveRewardManager.run_single (verl/experimental/reward_loop/reward_manager/
    naive.py; verl b178a3cd56f58b2d502255daba591e92833930a7): extra_info gains num_turns and
    rollout_reward_scores; a coroutine function (inspect.iscoroutinefunction, which sees through the partial) is
    awaited on the loop by keyword -- data_source=, solution_str=, ground_truth=, extra_info= and, with verl's
    own reward model, reward_router_address= and reward_model_tokenizer= -- where a plain one would run in the
    loop's default thread pool; a float result is the reward, kept again as reward_extra_info["acc"]."""
    assert inspect.iscoroutinefunction(compute_score), "verl would run it in the loop's thread pool"

    async def run_single(sample: dict) -> dict:
        extra_info = sample.get("extra_info", {})
        extra_info["num_turns"] = None
        extra_info["rollout_reward_scores"] = {}
        extra_reward_kwargs = ({"reward_router_address": reward_router_address, "reward_model_tokenizer": None}
                               if reward_router_address is not None else {})
        result = await compute_score(data_source=sample["data_source"], solution_str=sample["response"],
                                     ground_truth=sample["reward_model"]["ground_truth"], extra_info=extra_info,
                                     **extra_reward_kwargs)
        if isinstance(result, dict):
            return {"reward_score": result["score"], "reward_extra_info": dict(result)}
        return {"reward_score": result, "reward_extra_info": {"acc": result}}

    tasks = [asyncio.create_task(run_single(s)) for s in samples]
    return await asyncio.gather(*tasks)


def _samples(n: int) -> list[dict]:
    """verl's non-tensor batch, a dict per sample: prompts and message references as numpy object arrays;
    some responses with the thinking of a reasoning model (the reward is read after it)."""
    out = []
    for k in range(n):
        prompt = np.array([{"role": "user", "content": f"What is {k} + {k}?"}], dtype=object)
        ref = (f"{k} + {k} = {2 * k}." if k % 2 else
               np.array([{"role": "assistant", "content": f"It is {2 * k}."}], dtype=object))
        response = [f"{2 * k}", f"<think>add {k} twice</think> It is {2 * k}.", f"I think {k + 1}.",
                    f"so it is {2 * k}\n</think>\n\n{2 * k}."][k % 4]
        out.append({"data_source": "arith", "response": response, "reward_model": {"ground_truth": ref},
                    "extra_info": {"prompt": prompt, "index": k}})
    return out


def _sync_rewards(samples, **kw) -> list[float]:
    return [reward.compute_score(data_source=s["data_source"], solution_str=s["response"],
                                 ground_truth=s["reward_model"]["ground_truth"], extra_info=dict(s["extra_info"]),
                                 **kw) for s in samples]


def test_the_reward_loop_awaits_it_for_many_responses_at_once(scorer, tokenizer):
    samples = _samples(64)
    with live_server(scorer, tokenizer) as (url, _):
        want = _sync_rewards(samples, url=url)
        hook = _custom_reward_fn("compute_score_async", {"url": url})
        try:
            got = asyncio.run(_reward_loop(hook, samples))
            # with verl's own reward model configured, the two keywords it adds are taken and not used
            routed = asyncio.run(_reward_loop(hook, samples[:4], reward_router_address="127.0.0.1:1"))
        finally:
            reward._async_clients.pop((url, ()), None)
    assert len(set(want)) > 32  # the model tells the responses apart
    rewards = [g["reward_score"] for g in got]
    assert all(type(r) is float for r in rewards) and [g["reward_extra_info"] for g in got] == [
        {"acc": r} for r in rewards]
    np.testing.assert_allclose(rewards, want, rtol=0, atol=1e-5)  # batched with other requests, float32
    np.testing.assert_allclose([g["reward_score"] for g in routed], want[:4], rtol=0, atol=1e-5)


def test_each_event_loop_in_turn_gets_connections_of_its_own(scorer, tokenizer):
    """verl's reward workers each run a loop of their own, and a reward function may run each step under a new
    asyncio.run: one AsyncRewardClient per URL, whose httpx client (its connections bound to the loop that
    opened them) is the running loop's."""
    samples = _samples(8)
    seen = []

    async def step():
        client = reward._async_client_for(url)
        got = await _reward_loop(_custom_reward_fn("compute_score_async", {"url": url}), samples)
        seen.append((client, client._connections()))
        return [g["reward_score"] for g in got]

    with live_server(scorer, tokenizer) as (url, _):
        want = _sync_rewards(samples, url=url)
        try:
            first, second = asyncio.run(step()), asyncio.run(step())
            threaded = []
            worker = threading.Thread(target=lambda: threaded.append(asyncio.run(step())))
            worker.start()
            worker.join()
        finally:
            reward._async_clients.pop((url, ()), None)
    assert len({id(c) for c, _ in seen}) == 1 and len({id(h) for _, h in seen}) == 3
    for got in (first, second, threaded[0]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_the_in_process_scorer_runs_beside_the_loop(scorer, tokenizer):
    """With scorer=, the forward runs in a thread: the loop goes on meanwhile (it would hang here, the forward
    waiting for a coroutine the blocked loop never ran, until the wait gave up)."""
    forward_started, loop_ran = threading.Event(), threading.Event()

    class HeldUntilTheLoopRuns:  # the real model's forward, held until the event loop has run a coroutine
        max_positions = scorer.max_positions

        def score(self, batch):
            forward_started.set()
            assert loop_ran.wait(30), "the event loop was blocked during the forward"
            return scorer.score(batch)

    async def beside():
        while not forward_started.is_set():
            await asyncio.sleep(0.01)
        loop_ran.set()

    samples = _samples(6)
    in_process = InProcessScorer(HeldUntilTheLoopRuns(), tokenizer, max_wait_s=0.01)
    try:
        async def both():
            got = asyncio.gather(_reward_loop(_custom_reward_fn("compute_score_async", {"scorer": in_process}),
                                              samples), beside())
            return (await got)[0]

        got = asyncio.run(both())
        want = _sync_rewards(samples, scorer=in_process)
    finally:
        in_process.close()
    np.testing.assert_allclose([g["reward_score"] for g in got], want, rtol=0, atol=1e-5)


class _Counted:
    """The real model's forward, keeping how many items each forward scored."""

    def __init__(self, model):
        self.model, self.max_positions, self.sizes = model, model.max_positions, []

    def score(self, batch):
        out = self.model.score(batch)
        self.sizes.append(len(out))
        return out


class _OwnScorer:
    """A user's scorer: score(items) only, no score_async."""

    def __init__(self, score):
        self.score = score


def test_the_in_process_scorer_batches_every_response_in_flight(scorer, tokenizer):
    """Each call held a thread of the loop's pool (asyncio.to_thread(scorer.score)) while its forward was
    batched, so no forward scored more responses than the pool had threads (4 here, min(32, cpus + 4) by
    default) and the rest waited for a thread; now the batch is awaited holding none. Also with a full queue
    (its wait for room in the pool's threads) and a scorer of the user's own, which keeps the thread pool."""
    samples, threads = _samples(40), 4
    wide, narrow = _Counted(scorer), _Counted(scorer)
    # max_wait_s: every call's item is in the queue before the first round is taken
    batched = InProcessScorer(wide, tokenizer, max_wait_s=0.5)
    full = InProcessScorer(narrow, tokenizer, max_wait_s=0.2, max_queue_items=8)
    alone = InProcessScorer(scorer, tokenizer, max_wait_s=0.001)

    async def loop_of_few_threads(in_process):
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(threads))
        got = await _reward_loop(_custom_reward_fn("compute_score_async", {"scorer": in_process}), samples)
        return [g["reward_score"] for g in got]

    try:
        got = asyncio.run(loop_of_few_threads(batched))
        want = _sync_rewards(samples, scorer=alone)  # score(items), one response at a time
        queued = asyncio.run(loop_of_few_threads(full))
        own = asyncio.run(loop_of_few_threads(_OwnScorer(full.score)))
    finally:
        for each in (batched, full, alone):
            each.close()
    assert max(wide.sizes) > threads
    assert max(narrow.sizes) <= 8 and sum(narrow.sizes) == 2 * len(samples)
    assert len(set(want)) > 20  # the model tells the responses apart
    for rewards in (got, queued, own):
        assert all(type(r) is float for r in rewards)
        np.testing.assert_allclose(rewards, want, rtol=0, atol=1e-5)  # batched with others, float32


@pytest.mark.parametrize("kw", [
    dict(solution_str="a", ground_truth="", extra_info={"prompt": "q"}),
    dict(solution_str="a", ground_truth=None, extra_info={"prompt": "q"}),
    dict(solution_str="a", ground_truth=np.array([], dtype=object), extra_info={"prompt": "q"}),
    dict(solution_str="a", ground_truth="r", extra_info={"question": "q"}),
    dict(solution_str="a", ground_truth="r", extra_info=None),
], ids=["empty-reference", "no-reference", "no-messages", "no-prompt", "no-extra-info"])
def test_it_refuses_what_compute_score_refuses(kw):
    with pytest.raises(ValueError) as sync:
        reward.compute_score(data_source="d", url=NOWHERE, **kw)
    with pytest.raises(ValueError) as awaited:
        asyncio.run(reward.compute_score_async(data_source="d", url=NOWHERE, **kw))
    assert str(awaited.value) == str(sync.value)
    assert "ground_truth" in str(sync.value) or "'prompt'" in str(sync.value)
