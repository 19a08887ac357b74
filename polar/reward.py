"""POLAR rewards for RL trainers: the hooks verl and OpenRLHF call (trainers load this file by its
path), scoring through a client of `polar serve` (polar/reward_client.py, whose names this module
re-exports: `from polar.reward import RewardClient` works) or the model in this process
(polar/in_process_scorer.py).

    compute_score_batch(...)           verl's batch reward manager (verl before February 2026, which
                                       dropped it): custom_reward_function.name
    compute_score(...)                 verl's per-item managers (naive, the reward loop's default; the
                                       only managers verl has since February 2026): one request per
                                       response, batched with the others by the server
    compute_score_async(...)           the same as an `async def`, which verl's reward loop awaits on its
                                       event loop instead of running it in the loop's thread pool
    reward_func(queries, prompts, labels)   OpenRLHF's custom remote reward function
    trl_reward_func(...)               TRL's reward function (GRPOTrainer, RLOOTrainer and the trainers
                                       sharing their reward_funcs): reward_funcs=[trl_reward_func()]
    (scorer=InProcessScorer(...))      the hooks above with the model beside the trainer, same batching,
                                       no HTTP (polar.in_process_scorer)

An item is {"prompt", "reference", "output", "wrapper" (optional, "sft" by default)}, each text a
string or a list of {"role", "content"} messages (paper Sec. 3: the reward compares the output
with the reference trajectory for the same prompt).
"""
from __future__ import annotations

import asyncio
import os
import re
from typing import TYPE_CHECKING, Optional

from polar import reward_client
from polar.reward_client import (API_KEY_ENV, DEFAULT_MAX_BODY_BYTES, URL_ENV, AsyncRewardClient, RewardClient,
                                 RewardConnectionError, RewardServerError, RewardTimeoutError)

if TYPE_CHECKING:  # the hooks' scorer= argument
    from polar.in_process_scorer import InProcessScorer

__all__ = ["API_KEY_ENV", "DEFAULT_MAX_BODY_BYTES", "URL_ENV", "AsyncRewardClient", "RewardClient",
           "RewardConnectionError", "RewardServerError", "RewardTimeoutError", "compute_score", "compute_score_async",
           "compute_score_batch", "reward_func", "strip_thinking", "trl_reward_func", "TRLReward"]


def __getattr__(name: str):
    # `from polar.reward import InProcessScorer`, as the README said before it had a module of its own;
    # imported when asked, so that the HTTP clients do not load the serving stack
    if name == "InProcessScorer":
        from polar.in_process_scorer import InProcessScorer

        return InProcessScorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_THINKING = re.compile(r"<think>(.*?)</think>(.*)", re.DOTALL)


def strip_thinking(text: str) -> str:
    """The answer after a reasoning model's thinking, as POLAR's own verl reward function takes it
    (InternLM/POLAR src/polar/reward_func.py, extract_thinking_content): the text after the first
    `</think>` that follows a `<think>`, stripped. A text with a `</think>` and no `<think>` at all
    loses the text up to and including its first `</think>`, and the rest is stripped: chat
    templates that open the thinking in the generation prompt (DeepSeek-R1's, QwQ's) leave the
    rollout only `... </think> answer`, whose reasoning would otherwise be scored, and the answer
    cut off by the client's truncation of a long output (max_response). Any other text is scored
    as it is."""
    m = _THINKING.search(text)
    if m:
        return m.group(2).strip()
    if "<think>" not in text and "</think>" in text:
        return text.split("</think>", 1)[1].strip()
    return text


def _prompt_of(extra_info, i: int, key: str = "prompt"):
    if not isinstance(extra_info, dict) or key not in extra_info:
        raise ValueError(f"extra_infos[{i}] has no {key!r}: POLAR compares each response with the reference "
                         f"for the same prompt (put the prompt messages in extra_info[{key!r}])")
    return _prompt_messages(extra_info[key])


def _prompt_messages(prompt):
    """A prompt as an item takes it: a text, or its messages as dicts (joined by "\\n" by POLAR's format)."""
    if hasattr(prompt, "tolist"):  # verl hands numpy object arrays of messages
        prompt = prompt.tolist()
    if isinstance(prompt, (list, tuple)):
        return [dict(m) for m in prompt]
    return prompt


def _reference(ref, where: str, why: str):
    """A reference as an item takes it (a numpy array of messages, as verl and datasets hand them, as a list),
    after `polar serve`'s check, before any request (an empty one is refused: paper Sec. 3, the reward
    compares the output with it), raised as a ValueError naming `where`; `why`: what likely left it so."""
    from polar.serve import validation

    if hasattr(ref, "tolist"):
        ref = ref.tolist()
    try:
        validation.check_reference(validation.text_field(ref, where), where, why)
    except validation.RequestError as e:
        raise ValueError(e.message) from None
    return ref


def _score(items: list, url: Optional[str], scorer: "Optional[InProcessScorer]", client_kw: dict) -> list[float]:
    if scorer is not None:
        return scorer.score(items)
    return _client_for(url, **client_kw).score(items)


_clients: dict = {}
_async_clients: dict = {}


def _client_for(url: Optional[str], **kw) -> RewardClient:
    return _shared(_clients, RewardClient, url, kw)


def _async_client_for(url: Optional[str], **kw) -> AsyncRewardClient:
    """One AsyncRewardClient per URL and settings for all event loops: it keeps an httpx client per loop
    (an httpx.AsyncClient's connections belong to the loop that opened them; each of verl's reward workers
    runs a loop of its own)."""
    return _shared(_async_clients, AsyncRewardClient, url, kw)


def _shared(clients: dict, cls, url: Optional[str], kw: dict):
    key = (url or os.environ.get(URL_ENV), tuple(sorted(kw.items())))
    client = clients.get(key)
    if client is None:
        # the module's lock read at each call: a forked child's is a new one (reward_client's at-fork hook)
        with reward_client._making:
            client = clients.get(key)
            if client is None:
                client = clients[key] = cls(url, **kw)
    return client


def compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, prompt_key: str = "prompt", *,
                        url: Optional[str] = None, wrapper: str = "sft", scorer: "Optional[InProcessScorer]" = None,
                        **client_kw) -> list[float]:
    """verl's batch reward function (reward_model.reward_manager=batch, with reward_model.use_reward_loop=False):
    one reward per response. verl removed the batch manager in February 2026 (verl-project/verl 3df21a68,
    #5237), its reward loop running only per-item managers since: there give it compute_score_async.

    The response is the text after the thinking (`strip_thinking`), the ground truth is the
    reference trajectory (an empty one is refused, naming it), and the prompt comes from
    extra_info[prompt_key] (messages, joined by "\\n" as POLAR's format does; `prompt_key` as in
    POLAR's own compute_score_batch). The server is `url` (or $POLAR_REWARD_URL); `scorer` scores
    in-process instead."""
    items = _verl_items(solution_strs, ground_truths, extra_infos, prompt_key, wrapper, "ground_truths[{}]")
    return _score(items, url, scorer, client_kw)


def _verl_items(solution_strs, ground_truths, extra_infos, prompt_key, wrapper, ref_name: str) -> list[dict]:
    """The items of verl's hooks, references checked before any request; `ref_name`, formatted with a
    response's index, names its ground truth."""
    n = len(solution_strs)
    if not (len(ground_truths) == n and len(extra_infos) == n):
        raise ValueError(f"{n} solutions, {len(ground_truths)} ground truths and {len(extra_infos)} extra infos")
    items = []
    for i, (sol, ref, info) in enumerate(zip(solution_strs, ground_truths, extra_infos)):
        ref = _reference(ref, ref_name.format(i), "; verl passes each sample's reward_model.ground_truth: put the "
                         "reference trajectory there")
        items.append({"prompt": _prompt_of(info, i, prompt_key), "reference": ref, "output": strip_thinking(sol),
                      "wrapper": wrapper})
    return items


def compute_score(data_source, solution_str, ground_truth, extra_info=None, prompt_key: str = "prompt", *,
                  url: Optional[str] = None, wrapper: str = "sft", scorer: "Optional[InProcessScorer]" = None,
                  reward_router_address=None, reward_model_tokenizer=None, **client_kw) -> float:
    """verl's per-item reward function (the reward loop's naive manager, its default: reward.reward_manager.name,
    reward_model.reward_manager before verl's February 2026 config; the loop calls it for each response at once
    from worker threads; compute_score_async is its `async def`): compute_score_batch for one response.
    `reward_router_address` and `reward_model_tokenizer` (which verl passes when it runs a reward model of its
    own) are not used: the rewards come from `polar serve`."""
    items = _verl_items([solution_str], [ground_truth], [extra_info], prompt_key, wrapper, "ground_truth")
    return _score(items, url, scorer, client_kw)[0]


async def compute_score_async(data_source, solution_str, ground_truth, extra_info=None, prompt_key: str = "prompt",
                              *, url: Optional[str] = None, wrapper: str = "sft",
                              scorer: "Optional[InProcessScorer]" = None, reward_router_address=None,
                              reward_model_tokenizer=None, **client_kw) -> float:
    """compute_score as an `async def` (reward.custom_reward_function.name=compute_score_async): verl's reward
    loop managers (naive, dapo, gdpo, rate_limited) await a coroutine function on the worker's event loop, where
    they run a plain one in the loop's default thread pool (min(32, cpus + 4) threads), which bounded the
    requests in flight per reward worker and held a thread for each (its remote manager refuses a
    coroutine function: give it compute_score; rate_limited lets reward.max_concurrent calls run at once in
    each worker, 1 unless set). The request goes through the AsyncRewardClient shared by
    `url`'s callers, with a connection pool per event loop (httpx's, up to 100 connections). With `scorer`
    (an InProcessScorer), its score_async: the item is formatted in a thread of the loop's pool and the
    forward, in the scorer's batching thread, is awaited holding none, so all of the loop's responses in
    flight are batched together; a scorer without score_async (one of your own with score(items)) runs in
    a thread of that pool, the pool's size bounding the calls in flight. Same arguments, refusals and reward
    as compute_score."""
    items = _verl_items([solution_str], [ground_truth], [extra_info], prompt_key, wrapper, "ground_truth")
    if scorer is not None:
        score_async = getattr(scorer, "score_async", None)
        return (await (score_async(items) if score_async else asyncio.to_thread(scorer.score, items)))[0]
    return (await _async_client_for(url, **client_kw).score(items))[0]


def reward_func(queries, prompts, labels, *, url: Optional[str] = None, **client_kw):
    """OpenRLHF's custom reward function (--reward.remote_url reward.py defining it; --remote_rm_url before
    April 2026): the response is the query after its prompt, the label the reference (a text, or
    {"reference", "wrapper"} as /get_reward takes it). Returns OpenRLHF's dict of tensors."""
    import torch

    from polar.serve import validation

    if not (len(queries) == len(prompts) == len(labels)):
        raise ValueError(f"{len(queries)} queries, {len(prompts)} prompts and {len(labels)} labels; they must match")
    items = []
    for i, (q, p, lab) in enumerate(zip(queries, prompts, labels)):
        for name, text in (("queries", q), ("prompts", p)):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{i}] must be a string (OpenRLHF passes the decoded texts), "
                                f"got {type(text).__name__}")
        if not q.startswith(p):
            raise ValueError(f"queries[{i}] does not start with prompts[{i}]")
        item = {"prompt": p, "reference": lab, "output": q[len(p):]}
        if isinstance(lab, dict):
            if "reference" not in lab:
                raise ValueError(f"labels[{i}] is a dict without a 'reference'")
            item["reference"] = lab["reference"]
            if lab.get("wrapper") is not None:
                item["wrapper"] = lab["wrapper"]
        try:  # as /get_reward refuses them; what OpenRLHF sends without --data.label_key is ""
            validation.check_label_reference(validation.text_field(item["reference"], f"labels[{i}]"), i)
        except validation.RequestError as e:
            raise ValueError(e.message) from None
        items.append(item)
    r = torch.tensor(_client_for(url, **client_kw).score(items), dtype=torch.float32)
    return {"rewards": r, "scores": r, "extra_logs": {}}


# the keywords TRL adds to the dataset's columns (trl/trainer/grpo_trainer.py, _calculate_rewards), left out of
# the columns a missing reference column's error lists
_TRL_OWN = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


def trl_reward_func(url: Optional[str] = None, *, reference_column: str = "reference", wrapper: str = "sft",
                    scorer: "Optional[InProcessScorer]" = None, name: str = "polar_reward",
                    missing_reference: str = "error", **client_kw) -> "TRLReward":
    """TRL's reward function: `GRPOTrainer(..., reward_funcs=[trl_reward_func()])` (RLOOTrainer and the
    trainers sharing the hook alike). TRL calls it by keyword with the batch's prompts and completions and
    every other dataset column as a list, and logs its rewards as rewards/<name>/mean and /std.

    The reference trajectory is each row's `reference_column` (a text, or a conversational dataset's
    messages; a missing column or an empty reference is refused, naming the column and row). A prompt is a
    text or its messages; a completion a text or, conversational, its messages: an assistant message's
    content is scored after its thinking (`strip_thinking`), and the messages of a tool-calling rollout
    are joined as POLAR's format joins a message list. The server is `url` (else $POLAR_REWARD_URL, its
    key $POLAR_REWARD_API_KEY), with RewardClient's settings in `client_kw`; `scorer` scores in-process
    instead. Without a scorer the function pickles (TRL's async GRPO sends reward functions to a spawned
    rollout process).

    `missing_reference`: what a row whose reference is None gets. "error" (the default) refuses it, naming
    the row: a mis-named or unfilled column would otherwise train on nothing. "none" gives it None, which
    GRPOTrainer and RLOOTrainer both take as "this function does not apply to that sample" (its reward is
    NaN for this function and the weighted sum over the reward functions skips it): multi-task training,
    where another reward function (a verifier for math rows, say) scores the rows left without a reference
    (a missing value in a datasets column is None). Those rows are not sent; the others are scored in one
    call, and with no reference in the batch no call is made. An empty reference ("" or messages without
    content) is refused in both modes: it is a row meant for POLAR whose reference was lost, not another
    task's. A missing column is refused in both modes too. A row that every reward function gives None is
    left out of its group's baseline and gets no advantage (TRL warns, naming it)."""
    return TRLReward(url, reference_column=reference_column, wrapper=wrapper, scorer=scorer, name=name,
                     missing_reference=missing_reference, **client_kw)


# trl_reward_func's missing_reference values
_MISSING_REFERENCE = ("error", "none")


class TRLReward:
    """trl_reward_func's function: an object rather than a closure, which cannot be pickled; TRL names a
    reward function by its __name__ (trl/trainer/utils.py, get_callable_name) and runs it as a plain
    function (this one blocks; RewardClient is shared by threads)."""

    # An object pickled by a polar older than missing_reference has no such attribute: unpickled here, it
    # behaves as it did (a None reference refused) instead of failing on its first call.
    missing_reference = "error"

    def __init__(self, url: Optional[str] = None, *, reference_column: str = "reference", wrapper: str = "sft",
                 scorer: "Optional[InProcessScorer]" = None, name: str = "polar_reward",
                 missing_reference: str = "error", **client_kw):
        if not isinstance(reference_column, str) or not reference_column:
            raise ValueError(f"reference_column must be a dataset column's name, got {reference_column!r}")
        if not isinstance(missing_reference, str) or missing_reference not in _MISSING_REFERENCE:
            raise ValueError(f"missing_reference must be one of {list(_MISSING_REFERENCE)} (refuse a row without "
                             f"a reference, or give it None), got {missing_reference!r}")
        self.__name__ = name
        self.url, self.reference_column, self.wrapper, self.scorer = url, reference_column, wrapper, scorer
        self.missing_reference = missing_reference
        self.client_kw = client_kw

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.__name__!r}, reference_column={self.reference_column!r}, "
                f"missing_reference={self.missing_reference!r})")

    def __call__(self, prompts, completions, **columns) -> list[Optional[float]]:
        col = self.reference_column
        if col not in columns:
            given = sorted(k for k in columns if k not in _TRL_OWN)
            raise ValueError(f"TRL passed no column {col!r}: POLAR compares each completion with the reference "
                             f"trajectory for its prompt (paper Sec. 3); give the dataset a column {col!r} holding "
                             f"it, or name yours with trl_reward_func(reference_column=...); the dataset's columns: "
                             f"{given}")
        refs = columns[col]
        if not (len(prompts) == len(completions) == len(refs)):
            raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions and {len(refs)} values of "
                             f"{col!r}; they must match")
        # TRL turns a None reward into NaN for this function alone, and sums the reward functions with nansum
        # (huggingface/trl f2cd5771, trl/trainer/grpo_trainer.py:1663 and :1674 (an async function's), the sum at
        # :2683 and :2716; trl/trainer/rloo_trainer.py:1100 and :1111, the sum at :1518)
        rows, items = [], []
        for i, (prompt, completion, ref) in enumerate(zip(prompts, completions, refs)):
            if ref is None and self.missing_reference == "none":
                continue
            where = f"column {col!r}, row {i}"
            if ref is None:
                raise ValueError(f"{where} must be a string or an array of messages, got null; a row of a task "
                                 f"that POLAR does not score (another reward function's, in multi-task training): "
                                 f"trl_reward_func(missing_reference=\"none\") gives it None, which TRL skips")
            ref = _reference(ref, where,
                             f"; TRL passes each row's dataset column {col!r}: put the reference trajectory there")
            rows.append(i)
            items.append({"prompt": _prompt_messages(prompt), "reference": ref, "output": _trl_output(completion, i),
                          "wrapper": self.wrapper})
        rewards: list[Optional[float]] = [None] * len(refs)
        if items:
            for i, r in zip(rows, _score(items, self.url, self.scorer, self.client_kw)):
                rewards[i] = r
        return rewards


def _trl_output(completion, i: int):
    """A completion as the item's output: a text, or its messages' {role, content} (their thinking, and keys
    such as a parsed reasoning_content or tool_calls, are not scored)."""
    if isinstance(completion, str):
        return strip_thinking(completion)
    if not isinstance(completion, (list, tuple)) or not all(isinstance(m, dict) for m in completion):
        raise TypeError(f"completions[{i}] must be a text or a list of messages (TRL's conversational "
                        f"completions), got {type(completion).__name__}")
    messages = []
    for m in completion:
        content = m.get("content")
        if m.get("role") == "assistant" and isinstance(content, str):
            content = strip_thinking(content)
        messages.append({"role": m.get("role"), "content": content})
    return messages[0]["content"] if len(messages) == 1 else messages


if __name__ != "polar.reward":
    # Loaded by its path (verl's reward.custom_reward_function.path runs the file as "custom_module_<hash>",
    # OpenRLHF's reward file as "reward_func"), under a name no process can import again: the hooks are the
    # installed module's, which pickle by name. verl's prime reward manager (before February 2026) sends
    # compute_score to a process pool (a hook that cannot be pickled gave every response 0.0, the error only
    # printed) and its reward loop's remote manager to Ray workers; and one client per URL is shared with code
    # that imports polar.reward.
    from polar import reward as _installed

    globals().update({name: getattr(_installed, name) for name in ("compute_score", "compute_score_async",
                                                                    "compute_score_batch", "reward_func",
                                                                    "trl_reward_func", "TRLReward")})
