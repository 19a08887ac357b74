"""polar/reward.py, the trainers' hooks: verl's compute_score and compute_score_batch as verl calls them,
OpenRLHF's reward_func, the client each URL shares across threads, and the names kept importable from
polar.reward since the clients moved to polar/reward_client.py and the in-process scorer to
polar/in_process_scorer.py (their own tests: test_reward_client.py, test_in_process_scorer.py)."""
from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys

import numpy as np
import pytest

from polar import reward
from polar.in_process_scorer import InProcessScorer
from tests.polar.rewards_server import RewardsServer, at_once, free_port


def _verl_call(fn, reward_kwargs, **call_kw):
    """How verl calls a custom reward function (verl/trainer/ppo/reward.py, _call_with_kwargs): by
    keyword, with custom_reward_function.reward_kwargs merged in."""
    return fn(**{**call_kw, **reward_kwargs})


def test_verl_batch_function_takes_polars_prompt_key():
    # InternLM/POLAR's compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos,
    # prompt_key="prompt"): a config written for it (reward_kwargs.prompt_key) must work here too
    with RewardsServer() as srv:
        got = _verl_call(reward.compute_score_batch, {"url": srv.url, "prompt_key": "raw_prompt"},
                         data_sources=np.array(["d"] * 3, dtype=object),
                         # the third as DeepSeek-R1's template leaves it: `<think>` was in the prompt
                         solution_strs=["ab", "<think>x</think> abc", "so it is 4\n</think>\n\nabcd"],
                         ground_truths=["r"] * 3,
                         extra_infos=np.array([{"raw_prompt": "p"}, {"raw_prompt": [{"role": "user", "content": "p"}]},
                                               {"raw_prompt": "p"}], dtype=object))
    assert got == [2.0, 3.0, 4.0]
    assert [it["prompt"] for it in srv.bodies[0]["items"]] == ["p", [{"role": "user", "content": "p"}], "p"]


def test_verl_per_item_function_as_the_reward_loop_calls_it():
    # verl's reward loop (the only reward path since February 2026) runs per-item managers only (naive, dapo,
    # gdpo, rate_limited, remote): compute_score(data_source=, solution_str=, ground_truth=, extra_info=) -> a
    # float, from threads (verl/experimental/reward_loop/reward_manager/naive.py, run_single; verl-project/verl
    # 1dda039b9c6311889a9c9a26040677e1254814f9, 2026-08-22, the same call as volcengine/verl b178a3cd's)
    import concurrent.futures

    prompt = np.array([{"role": "user", "content": "q"}], dtype=object)
    with RewardsServer() as srv:
        def one(n):
            return _verl_call(reward.compute_score, {"url": srv.url}, data_source="d", solution_str="x" * n,
                              ground_truth=np.array([{"role": "assistant", "content": "r"}], dtype=object),
                              extra_info={"prompt": prompt, "num_turns": None, "rollout_reward_scores": {}})

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(one, [1, 2, 3, 4]))
        # with verl's own reward model configured, it adds these two keywords
        extra = reward.compute_score("d", "xy", "r", {"prompt": "q"}, url=srv.url, reward_router_address=None,
                                     reward_model_tokenizer=None)
    assert got == [1.0, 2.0, 3.0, 4.0] and all(type(g) is float for g in got)
    assert extra == 2.0
    assert srv.bodies[0]["items"][0]["reference"] == [{"role": "assistant", "content": "r"}]


def test_the_in_process_scorer_is_still_imported_from_polar_reward():
    """Its import was `from polar.reward import InProcessScorer` until it moved to polar/in_process_scorer.py."""
    from polar.reward import InProcessScorer as old_path

    assert old_path is InProcessScorer
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        reward.NoSuchName


def test_the_clients_keep_their_polar_reward_names_and_pickles_naming_them_there_load():
    """The clients moved from polar/reward.py to polar/reward_client.py, leaving the trainers' hooks (loaded by
    path) there: `from polar.reward import RewardClient` (the README's) names the same classes, and a client or
    an error pickled before the move, whose pickle names its class polar.reward.X, loads as that class."""
    from polar import reward_client

    names = ("RewardClient", "AsyncRewardClient", "RewardServerError", "RewardConnectionError",
             "RewardTimeoutError", "URL_ENV", "API_KEY_ENV", "DEFAULT_MAX_BODY_BYTES")
    assert all(getattr(reward, name) is getattr(reward_client, name) for name in names)
    assert set(names) | {"compute_score", "compute_score_async", "compute_score_batch", "reward_func", "strip_thinking",
                          "trl_reward_func", "TRLReward"} == set(reward.__all__)
    # as verl loads custom_reward_function.path: the file under a name of verl's
    spec = importlib.util.spec_from_file_location("custom_module", reward.__file__)
    by_path = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(by_path)
    assert by_path.RewardClient is reward_client.RewardClient and by_path.strip_thinking("<think>a</think> b") == "b"

    def pickled_before(obj) -> bytes:
        # protocol 2 names a class as text, "c<module>\n<name>\n": the module as the old code's was
        data = pickle.dumps(obj, protocol=2)
        assert b"cpolar.reward_client\n" in data
        return data.replace(b"cpolar.reward_client\n", b"cpolar.reward\n")

    error = pickle.loads(pickled_before(reward.RewardServerError(503, "busy", "http://h/v1/rewards")))
    assert type(error) is reward_client.RewardServerError and (error.status, error.url) == (503, "http://h/v1/rewards")
    timeout = pickle.loads(pickled_before(reward.RewardTimeoutError("no answer", url="http://h", attempts=2)))
    assert type(timeout) is reward_client.RewardTimeoutError and (str(timeout), timeout.attempts) == ("no answer", 2)
    client = pickle.loads(pickled_before(reward.RewardClient("http://h:1", chunk_size=3)))
    assert type(client) is reward_client.RewardClient and (client.base_url, client.chunk_size) == ("http://h:1", 3)


@pytest.mark.parametrize("queries,prompts,message", [
    (["Q: a", 5], ["Q:", "Q:"], r"queries\[1\] must be a string .*, got int"),
    (["Q: a", None], ["Q:", "Q:"], r"queries\[1\] must be a string .*, got NoneType"),
    (["Q: a", "Q: b"], ["Q:", [{"role": "user", "content": "Q:"}]], r"prompts\[1\] must be a string .*, got list"),
    ([b"Q: a"], ["Q:"], r"queries\[0\] must be a string .*, got bytes"),
])
def test_reward_func_names_a_query_or_prompt_that_is_not_text(queries, prompts, message):
    """OpenRLHF hands decoded texts; anything else failed with an AttributeError ('int' object has no
    attribute 'startswith') or a TypeError from str.startswith, naming neither the argument nor the item."""
    with pytest.raises(TypeError, match=message):
        reward.reward_func(queries, prompts, ["ref"] * len(queries), url="http://127.0.0.1:9")


def test_threads_making_the_first_call_at_once_share_one_client():
    """verl's reward loop calls compute_score for each response at once from worker threads: each
    thread found no client for the URL and made one (an httpx client and its pool of connections,
    ~0.1 s to make), one was kept and the others were dropped unclosed, their connections leaked."""
    url = f"http://127.0.0.1:{free_port()}"  # a URL no other test used: no client for it yet
    got = at_once(lambda: reward._client_for(url, chunk_size=3))
    try:
        assert len({id(c) for c in got}) == 1, f"{len({id(c) for c in got})} clients made for one URL"
    finally:
        for key in [k for k, c in reward._clients.items() if c in got]:
            reward._clients.pop(key)
        for c in {id(c): c for c in got}.values():
            c.close()


def test_the_clients_without_httpx_name_the_extra(tmp_path):
    """A wheel installed without [client]: `import polar.reward` (verl's custom_reward_function, OpenRLHF's
    --remote_rm_url file) failed with a bare "No module named 'httpx'", which names no extra."""
    code = "import sys; sys.modules['httpx'] = None\nimport polar.reward"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "ModuleNotFoundError: polar.reward's clients need the module 'httpx'" in proc.stderr, proc.stderr[-2000:]
    assert "pip install 'polar-rm[client]'" in proc.stderr


def _with_reward_kwargs(fn, reward_kwargs, *args, **kwargs):
    # verl's custom reward function as its managers get it: the function in a functools.partial with
    # custom_reward_function.reward_kwargs merged over the call's keywords (verl/trainer/ppo/reward.py,
    # get_custom_reward_fn; volcengine/verl b178a3cd56f58b2d502255daba591e92833930a7)
    return fn(*args, **{**kwargs, **reward_kwargs})


def test_verl_prime_manager_sends_the_hook_loaded_by_its_path_to_worker_processes():
    """verl's prime reward manager (verl/workers/reward_manager/prime.py, single_compute_score; verl
    b178a3cd) runs `partial(compute_score, data_source, solution_str, ground_truth, extra_info)` in a
    ProcessPoolExecutor, so the function is pickled, by name. Loaded from custom_reward_function.path
    (verl's load_module: the file as "custom_module_<hash>", put in no sys.modules) the hook could not
    be pickled, and prime turns each failed task into a reward of 0.0, the error only printed."""
    import concurrent.futures
    import functools
    import os

    spec = importlib.util.spec_from_file_location(f"custom_module_{hash(os.path.abspath(reward.__file__))}",
                                                  reward.__file__)
    by_path = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(by_path)
    with RewardsServer() as srv:
        evaluation_func = functools.partial(_with_reward_kwargs, by_path.compute_score, {"url": srv.url})
        with concurrent.futures.ProcessPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(functools.partial(evaluation_func, "d", "x" * n, "r", {"prompt": "q"}))
                       for n in (1, 2, 3)]
            got = [f.result(timeout=120) for f in futures]
    assert got == [1.0, 2.0, 3.0]
    assert sorted(len(b["items"][0]["output"]) for b in srv.bodies) == [1, 2, 3]


def test_openrlhf_reward_file_as_its_single_turn_executor_calls_it(monkeypatch):
    """OpenRLHF (openrlhf/utils/agent.py, SingleTurnAgentExecutor; OpenRLHF/OpenRLHF 3c3be623, 2026-08-13)
    loads `--reward.remote_url <file>.py` as the module "reward_func" and, for each rollout as it finishes,
    calls `reward_func([query], [prompt], [label])` in a thread (asyncio.to_thread), with no settings (the
    URL from POLAR_REWARD_URL); it keeps the answer's "scores" (else "rewards") and "extra_logs", and makes
    the rollout's reward with torch.tensor([scores])."""
    import asyncio

    import torch

    spec = importlib.util.spec_from_file_location("reward_func", reward.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    async def rollouts(n):
        return await asyncio.gather(*(asyncio.to_thread(module.reward_func, [f"<q>{'x' * k}"], ["<q>"], ["r"])
                                      for k in range(1, n + 1)))

    with RewardsServer() as srv:
        monkeypatch.setenv(reward.URL_ENV, srv.url)
        answers = asyncio.run(rollouts(3))
    scores = [a.get("scores") if a.get("scores") is not None else a.get("rewards") for a in answers]
    assert [torch.tensor([s]).tolist() for s in scores] == [[1.0], [2.0], [3.0]]
    assert all(a["extra_logs"] == {} for a in answers)
    assert sorted(b["items"][0]["output"] for b in srv.bodies) == ["x", "xx", "xxx"]
