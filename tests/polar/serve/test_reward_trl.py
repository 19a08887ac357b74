"""polar/reward.py's TRL hook (trl_reward_func), called as TRL calls a reward function, against `polar serve`
on loopback (the serve tests' small real model) and the in-process scorer: its rewards are RewardClient's for
the items built by hand, conversational and plain; and its refusals, before any request."""
import asyncio
import functools
import importlib.util
import inspect
import pickle
import re

import numpy as np
import pytest

from polar import reward
from polar.in_process_scorer import InProcessScorer

from .conftest import live_server

NOWHERE = "http://127.0.0.1:9"  # the refusals come before any request


def _trl_calculate_rewards(reward_func, inputs, prompts, completions, completion_ids, environments=None):
    """A reward function that is not a model, called as TRL calls it (trl/trainer/grpo_trainer.py,
    GRPOTrainer._calculate_rewards; RLOOTrainer's in trl/trainer/rloo_trainer.py is the same without
    `environments`; huggingface/trl f2cd57710ae345ea6428ae95363267fcf38a3dc8, 2026-07-24): by keyword, prompts=,
    completions=, completion_ids= and each column of the batch's rows other than "prompt", "completion" and
    "completion_ids" as a list, with trainer_state (a transformers.TrainerState), log_extra(column, values),
    log_metric(name, value), and environments when an environment_factory is set; an `async def` one is awaited
    (on TRL's own loop); a None reward becomes NaN in a float32 tensor. Returns (rewards, extra columns, metrics,
    the name TRL logs it under: the __name__ of the function, a functools.partial unwrapped, else its type's)."""
    import torch
    from transformers import TrainerState

    extra, metrics = {}, {}
    columns = [key for key in inputs[0] if key not in ("prompt", "completion", "completion_ids")]
    kwargs = {key: [row[key] for row in inputs] for key in columns}
    kwargs["trainer_state"] = TrainerState(global_step=3, max_steps=10)
    kwargs["log_extra"] = extra.__setitem__
    kwargs["log_metric"] = lambda name, value: metrics.setdefault(name, []).append(value)
    if environments is not None:
        kwargs["environments"] = environments
    call = functools.partial(reward_func, prompts=prompts, completions=completions, completion_ids=completion_ids,
                             **kwargs)
    out = asyncio.run(call()) if inspect.iscoroutinefunction(reward_func) else call()
    rewards = torch.tensor([r if r is not None else torch.nan for r in out], dtype=torch.float32)
    func = reward_func
    while isinstance(func, functools.partial):
        func = func.func
    return rewards.tolist(), extra, metrics, getattr(func, "__name__", type(func).__name__)


SYSTEM = {"role": "system", "content": "Answer briefly."}
CONVERSATIONAL = [  # rows of a conversational dataset; the reference a text or messages
    {"prompt": [SYSTEM, {"role": "user", "content": "What is 2 + 2?"}], "reference": "2 + 2 = 4.", "level": 1},
    {"prompt": [{"role": "user", "content": "Name a primary colour."}],
     "reference": [{"role": "assistant", "content": "Red is a primary colour."}], "level": 2},
]
# TRL's conversational completions: [{"role": "assistant", "content": ...}] (decoded, the thinking in the content,
# or parsed by parse_response, the thinking in reasoning_content), and a tool-calling rollout's several messages
COMPLETIONS = [
    [{"role": "assistant", "content": "<think>2 and 2 make 4</think>\n\nIt is 4."}],
    [{"role": "assistant", "content": "Four.", "reasoning_content": "adding them gives four"}],
    [{"role": "assistant", "content": "Blue.\n"}],
    [{"role": "assistant", "content": "<think>look it up</think>", "tool_calls": [
        {"type": "function", "function": {"name": "colours", "arguments": {}}}]},
     {"role": "tool", "name": "colours", "content": "red, yellow, blue"},
     {"role": "assistant", "content": "<think>the first</think> Red."}],
]
# the items by hand: the output after its thinking, a tool-calling rollout's messages joined as the format joins them
WANT_OUTPUTS = ["It is 4.", "Four.", "Blue.\n", [{"role": "assistant", "content": ""},
                                                 {"role": "tool", "content": "red, yellow, blue"},
                                                 {"role": "assistant", "content": "Red."}]]

PLAIN = [{"prompt": "Q: What is 2 + 2?\nA:", "reference": " 4", "level": 1},
         {"prompt": "Q: Name a primary colour.\nA:", "reference": " Red.", "level": 2}]
# DeepSeek-R1's template opens the thinking in the prompt: the decoded completion holds only `... </think> answer`
PLAIN_COMPLETIONS = [" 2 and 2 make 4</think>\n\n 4", " Five", " <think>hm</think> Blue", " Red."]
PLAIN_OUTPUTS = ["4", " Five", "Blue", " Red."]


def _batch(rows, completions):
    """GRPO's batch: each row repeated for its generations (num_generations=2), as TRL's sampler repeats it."""
    inputs = [dict(rows[i // 2]) for i in range(len(completions))]
    return inputs, [row["prompt"] for row in inputs], [[7] * (i + 1) for i in range(len(completions))]


def _items(inputs, outputs):
    return [{"prompt": row["prompt"], "reference": row["reference"], "output": out, "wrapper": "sft"}
            for row, out in zip(inputs, outputs)]


@pytest.mark.parametrize("rows,completions,outputs", [(CONVERSATIONAL, COMPLETIONS, WANT_OUTPUTS),
                                                      (PLAIN, PLAIN_COMPLETIONS, PLAIN_OUTPUTS)],
                         ids=["conversational", "plain"])
def test_trl_hook_gives_the_clients_rewards_for_the_same_items(scorer, tokenizer, rows, completions, outputs,
                                                               monkeypatch):
    inputs, prompts, completion_ids = _batch(rows, completions)
    want_items = _items(inputs, outputs)
    in_process = InProcessScorer(scorer, tokenizer, max_wait_s=0.01)
    try:
        with live_server(scorer, tokenizer) as (url, _):
            want = reward.RewardClient(url).score(want_items)
            got, extra, metrics, name = _trl_calculate_rewards(reward.trl_reward_func(url), inputs, prompts,
                                                               completions, completion_ids)
            # the URL from the environment, as reward_func takes it; pickled, as TRL's async GRPO sends it to its
            # rollout process; a name of its own for TRL's logs, and a RewardClient setting
            monkeypatch.setenv(reward.URL_ENV, url)
            hook = pickle.loads(pickle.dumps(reward.trl_reward_func(name="polar_7b", chunk_size=1)))
            from_env, _, _, env_name = _trl_calculate_rewards(hook, inputs, prompts, completions, completion_ids,
                                                              environments=[object()] * len(completions))
        in_process_got, _, _, _ = _trl_calculate_rewards(reward.trl_reward_func(scorer=in_process), inputs, prompts,
                                                         completions, completion_ids)
        in_process_want = in_process.score(want_items)
    finally:
        in_process.close()
    assert len(set(want)) == len(want)  # the model tells the completions apart
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # float32, as TRL keeps them
    np.testing.assert_allclose(from_env, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(in_process_got, in_process_want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(in_process_got, want, rtol=0, atol=1e-4)
    assert (name, env_name) == ("polar_reward", "polar_7b") and (extra, metrics) == ({}, {})


def test_trl_hook_takes_the_reference_from_the_column_it_is_given(scorer, tokenizer):
    rows = [{"prompt": row["prompt"], "answer": row["reference"], "reference": ""} for row in CONVERSATIONAL]
    inputs, prompts, completion_ids = _batch(rows, COMPLETIONS)
    in_process = InProcessScorer(scorer, tokenizer, max_wait_s=0.01)
    try:
        got, _, _, _ = _trl_calculate_rewards(reward.trl_reward_func(reference_column="answer", scorer=in_process),
                                              inputs, prompts, COMPLETIONS, completion_ids)
        want = in_process.score([{"prompt": row["prompt"], "reference": row["answer"], "output": out}
                                 for row, out in zip(inputs, WANT_OUTPUTS)])
    finally:
        in_process.close()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _served(service) -> tuple[float, float]:
    """(requests answered, items scored) so far by the live server."""
    requests = sum(s.value for m in service.metrics.requests.collect() for s in m.samples
                   if s.name.endswith("_total"))
    return requests, service.metrics.registry.get_sample_value("polar_serve_items_total")


def test_trl_hook_gives_none_to_rows_without_a_reference_when_asked(scorer, tokenizer):
    """Multi-task training: rows of another task (scored by another reward function) have no reference, and
    TRL's GRPOTrainer and RLOOTrainer take a None reward as "does not apply" (NaN for this function, skipped
    by the weighted nansum). Those rows get None, unsent; the others one request, in TRL's row order."""
    rows = [PLAIN[0], {"prompt": "Q: Is 7 prime?\nA:", "reference": None, "level": 3}, PLAIN[1]]
    completions = PLAIN_COMPLETIONS[:2] + [" yes", " no"] + PLAIN_COMPLETIONS[2:]
    inputs, prompts, completion_ids = _batch(rows, completions)
    columns = {"reference": [row["reference"] for row in inputs], "level": [row["level"] for row in inputs]}
    with live_server(scorer, tokenizer) as (url, service):
        hook = pickle.loads(pickle.dumps(reward.trl_reward_func(url, missing_reference="none", max_retries=0)))
        want = reward.RewardClient(url).score(_items(inputs[:2] + inputs[4:], PLAIN_OUTPUTS))
        before = _served(service)
        got = hook(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        after = _served(service)
        every_row_without = hook(prompts=prompts[2:4], completions=completions[2:4],
                                 completion_ids=completion_ids[2:4], reference=[None, None], level=[3, 3])
        unsent = _served(service)
        as_trl, _, _, _ = _trl_calculate_rewards(hook, inputs, prompts, completions, completion_ids)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 4)  # one request, the rows with a reference
    assert [i for i, r in enumerate(got) if r is None] == [2, 3]
    np.testing.assert_allclose(got[:2] + got[4:], want, rtol=0, atol=1e-5)
    assert every_row_without == [None, None] and unsent == after
    assert np.isnan(as_trl[2:4]).all()
    np.testing.assert_allclose(as_trl[:2] + as_trl[4:], want, rtol=0, atol=1e-5)
    # in-process: one scorer call with the rows that have a reference, none for a batch without
    in_process = _CountedScorer(scorer, tokenizer, max_wait_s=0.01)
    try:
        hook = reward.trl_reward_func(scorer=in_process, missing_reference="none")
        got = hook(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        assert hook(prompts=prompts[2:4], completions=completions[2:4], completion_ids=completion_ids[2:4],
                    reference=[None, None], level=[3, 3]) == [None, None]
    finally:
        in_process.close()
    assert in_process.calls == [4] and [i for i, r in enumerate(got) if r is None] == [2, 3]
    np.testing.assert_allclose(got[:2] + got[4:], want, rtol=0, atol=1e-4)


class _CountedScorer(InProcessScorer):
    """The in-process scorer, counting the items of each score call."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls = []

    def score(self, items):
        self.calls.append(len(items))
        return super().score(items)


@pytest.mark.parametrize("mode", ["None", "skip", "", None, True])
def test_trl_hook_refuses_an_unknown_missing_reference_mode(mode):
    with pytest.raises(ValueError, match=r"missing_reference must be one of \['error', 'none'\] .*got " +
                       re.escape(repr(mode))):
        reward.trl_reward_func(NOWHERE, missing_reference=mode)


def test_trl_hook_refuses_a_dataset_without_the_reference_column():
    """POLAR's reward compares the completion with the reference for its prompt (paper Sec. 3): without the
    column there is nothing to compare with."""
    rows = [{"prompt": "Q: 2 + 2?", "solution": "4", "level": 1}]
    inputs, prompts, completion_ids = _batch(rows, [" 4", " 5"])
    with pytest.raises(ValueError, match=r"TRL passed no column 'reference': .*\(reference_column=.*"
                                         r"the dataset's columns: \['level', 'solution'\]"):
        _trl_calculate_rewards(reward.trl_reward_func(NOWHERE), inputs, prompts, [" 4", " 5"], completion_ids)
    with pytest.raises(ValueError, match="TRL passed no column 'answer'"):
        _trl_calculate_rewards(reward.trl_reward_func(NOWHERE, reference_column="answer"), inputs, prompts,
                               [" 4", " 5"], completion_ids)
    # a missing column is a dataset's or setting's mistake, not rows of another task
    with pytest.raises(ValueError, match="TRL passed no column 'reference'"):
        _trl_calculate_rewards(reward.trl_reward_func(NOWHERE, missing_reference="none"), inputs, prompts,
                               [" 4", " 5"], completion_ids)


EMPTY_REFERENCES = [
    ("", r"column 'reference', row 2: the reference is empty; TRL passes each row's dataset column 'reference'"),
    (" \n", r"column 'reference', row 2: the reference is empty \(only whitespace\)"),
    ([{"role": "assistant", "content": ""}], r"column 'reference', row 2: the reference is empty"),
]
NONE_REFERENCE = (None, r"column 'reference', row 2 must be a string or an array of messages, got null; a row of a "
                        r"task that POLAR does not score .*missing_reference=\"none\"\) gives it None")


@pytest.mark.parametrize("mode", [{}, {"missing_reference": "error"}], ids=["default", "error"])
@pytest.mark.parametrize("ref,message", EMPTY_REFERENCES + [NONE_REFERENCE])
def test_trl_hook_refuses_an_empty_reference_naming_its_row(ref, message, mode):
    """The default refuses a None reference too: a mis-named or unfilled column would train on nothing."""
    _refused(ref, message, mode)


@pytest.mark.parametrize("ref,message", EMPTY_REFERENCES)
def test_trl_hook_giving_none_to_rows_without_a_reference_still_refuses_an_empty_one(ref, message):
    """missing_reference="none" lets only None through: an empty reference is a row meant for POLAR whose
    reference was lost, not a row of another task."""
    _refused(ref, message, {"missing_reference": "none"})


def _refused(ref, message, mode):
    rows = [{"prompt": "Q: 2 + 2?", "reference": "4"}, {"prompt": "Q: 3 + 3?", "reference": ref}]
    inputs, prompts, completion_ids = _batch(rows, [" 4", " 5", " 6", " 7"])
    with pytest.raises(ValueError, match=message):
        _trl_calculate_rewards(reward.trl_reward_func(NOWHERE, **mode), inputs, prompts, [" 4", " 5", " 6", " 7"],
                               completion_ids)


def test_trl_hook_names_a_completion_that_is_neither_text_nor_messages():
    inputs, prompts, completion_ids = _batch(PLAIN, [" 4", 4])
    with pytest.raises(TypeError, match=r"completions\[1\] must be a text or a list of messages .*got int"):
        _trl_calculate_rewards(reward.trl_reward_func(NOWHERE), inputs, prompts, [" 4", 4], completion_ids)


def test_trl_hook_loaded_by_its_path_is_the_installed_one():
    """As the other hooks: a file loaded by path hands out the installed module's, which pickle by name."""
    spec = importlib.util.spec_from_file_location("reward_by_path", reward.__file__)
    by_path = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(by_path)
    hook = by_path.trl_reward_func(NOWHERE, reference_column="answer", missing_reference="none")
    assert by_path.trl_reward_func is reward.trl_reward_func and type(hook) is reward.TRLReward
    again = pickle.loads(pickle.dumps(hook))
    assert (again.__name__, again.reference_column, again.url, again.missing_reference) == (
        "polar_reward", "answer", NOWHERE, "none")


def test_trl_hook_pickled_before_missing_reference_keeps_refusing_a_row_without_one():
    """A TRLReward pickled by a polar before missing_reference (its state lacks the attribute) loads here and
    refuses a None reference as it did then, rather than failing on the attribute at its first call."""
    hook = reward.trl_reward_func(NOWHERE, missing_reference="none")
    del hook.__dict__["missing_reference"]  # what such a pickle holds: the class's name and this state
    older = pickle.loads(pickle.dumps(hook))
    assert "missing_reference" not in older.__dict__ and older.missing_reference == "error"
    rows = [{"prompt": "Q: 2 + 2?", "reference": "4"}, {"prompt": "Q: 3 + 3?", "reference": None}]
    inputs, prompts, completion_ids = _batch(rows, [" 4", " 5", " 6", " 7"])
    with pytest.raises(ValueError, match=NONE_REFERENCE[1]):
        _trl_calculate_rewards(older, inputs, prompts, [" 4", " 5", " 6", " 7"], completion_ids)
