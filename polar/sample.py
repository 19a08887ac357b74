"""`polar sample`: POLAR pre-training triplets from a prompt corpus and a pool of policies.

For prompt i (0 <= i < --num-prompts), everything that does not come back from a server depends
only on --seed and i, never on timing or completion order:

- the prompt: with probability --instruction-share an instruction prompt (used whole), otherwise a
  corpus document cut to its first L tokens, L uniform in [--prefix-min-tokens, --prefix-max-tokens]
  (POLAR paper App. D: 1..1024), counted with --tokenizer; the cut is at a token boundary (the kept
  ids are decoded), moved back to the previous character if it splits one. Documents are drawn with
  replacement; a document shorter than L is used whole.
- the policies: a seeded order of the pool's policy names; A is the first and B the second policy of
  that order that are still in the pool. A samples twice (reference, chosen), B once (rejected),
  each request with its own seed derived from (--seed, i, role), which vLLM and SGLang honour.
- repetition loops are truncated, not dropped (polar/repetition.py).

Each finished prompt is one JSONL line in the official record format, plus metadata a reader of
that format ignores:

    {"prompt": str, "reference": str, "chosen": str, "rejected": str, "wrapper": "pretrain",
     "id": i, "policy_a": name, "policy_b": name, "source": "corpus"|"instruction",
     "doc": "file:line", "prompt_tokens": L', "truncated_loops": [roles cut],
     "skipped_policies": [names passed over because they left the pool], "finish_reasons": {...}}

Failures: a request is retried (exponential backoff with full jitter) on connection errors,
timeouts, 5xx and 429. An endpoint with --endpoint-max-failures consecutive failed attempts leaves
the pool for the rest of the run once they have lasted --retry-cap seconds (from the first one's
sending) or used up a request's retries, so a blip that fails every request in flight at once does
not take it out; one that refuses a request with 401, 403 or 404 (a wrong key, model name or URL,
which fails every request) at that first refusal; prompts waiting on it are re-drawn (the next live
policies of their own order). A prompt a policy refuses (HTTP 400, 413, 422: too long for its
context, say), or for which policy A's reference is only whitespace (a record no build takes), goes
to the next policies of its order too, and an endpoint that refuses
--endpoint-max-failures requests in a row without answering one (a hosted API rejecting top_k or
seed) leaves the pool. A prompt that still cannot be completed goes to the failures file with
the reason; the next run with the same arguments retries it, because a run samples every id that is
not yet in the output. Records are written one line at a time and flushed; a line torn by a kill
mid-write is cut off (with a message) on restart. `<output>.run.json` keeps the settings that decide
what a record contains, so a restart with different ones stops instead of mixing two datasets. The
output is locked while a run writes it: a second run on it stops at once.

This module samples and writes the records (Sampler) and runs the command (main); the command line's
arguments, their checks and the settings `<output>.run.json` keeps are polar/sample_args.py's.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from engine.progress import format_duration
from polar.openai_client import Completion, RequestFailure, SamplingParams, backoff_delay, complete
from polar.policy_pool import Policy, PoolError, load_pool
from polar.prompt_sources import PromptMaker, SampleError, TextSource
from polar.repetition import truncate_loop
from polar.sample_args import build_parser, check_args, record_settings
from polar.sample_output import check_settings, lock_output, read_done_ids

ROLES = ("reference", "chosen", "rejected")


# ----------------------------------------------------------------------------- policies

def policy_order(seed: int, i: int, names: list[str]) -> list[str]:
    """Prompt i's seeded order of the pool; sorted first so the YAML's entry order does not matter."""
    return random.Random(f"polar-sample/{seed}/policies/{i}").sample(sorted(names), len(names))


def request_seed(seed: int, i: int, role: str) -> int:
    digest = hashlib.sha256(f"polar-sample/{seed}/request/{i}/{role}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------- the run

@dataclass
class RunConfig:
    num_prompts: int
    seed: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    send_seed: bool = True
    concurrency: int = 64
    request_timeout: float = 600.0
    max_retries: int = 5
    retry_base: float = 1.0
    retry_cap: float = 60.0
    endpoint_max_failures: int = 10
    loop_min_repeats: int = 4
    loop_min_chars: int = 32
    progress_interval: float = 10.0
    max_records: int | None = None


class EndpointDown(Exception):
    pass


class PromptFailed(Exception):
    pass


class PolicyRefused(PromptFailed):
    """A policy refused this prompt (HTTP 400, 413, 422: the prompt's, or the endpoint's settings):
    the prompt goes to the next policies of its order, as for an endpoint that is down."""


class Endpoint:
    """Run-time state of one policy: its concurrency limit, health and error counts."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.slots = asyncio.Semaphore(policy.max_concurrency)
        self.consecutive_failures = 0
        self.failing_since: float | None = None  # when the first failed attempt of the streak was sent
        self.refusals_in_a_row = 0  # requests refused (PolicyRefused) since its last answer
        self.down_reason: str | None = None
        self.requests = 0
        self.ok = 0
        self.retries = 0
        self.errors: Counter = Counter()

    @property
    def down(self) -> bool:
        return self.down_reason is not None


def _in_thread(fn, *args) -> asyncio.Future:
    # Daemon threads rather than an executor: a request stuck for --request-timeout must not keep the
    # process alive after Ctrl-C or a stop, and nothing it would return is needed then.
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(result, error):
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(result)

    def work():
        try:
            result, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting coroutine, which decides
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: the run is over
            pass

    threading.Thread(target=work, daemon=True).start()
    return fut


def _json_line(obj: dict) -> str:
    line = json.dumps(obj, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        # A server can return a lone surrogate ("\ud800" in its JSON); escaped, it stays valid JSON
        # instead of failing the write of a finished record.
        line = json.dumps(obj, ensure_ascii=True)
    return line + "\n"


class Sampler:
    def __init__(self, cfg: RunConfig, prompts: PromptMaker, policies: list[Policy], output: str,
                 failures: str, log=None):
        self.cfg, self.prompts, self.output, self.failures_path = cfg, prompts, output, failures
        self.log = log or sys.stderr
        self.policies = policies
        self.names = [p.name for p in policies]
        self.jitter = random.Random()  # retry timing only; never reaches a record
        self.written = 0
        self.failed = 0
        self.loops_cut = 0
        self.stopping = False
        self.stop_reason: str | None = None
        self.already_done = 0

    # one request, retried
    async def _request(self, ep: Endpoint, prompt: str, seed: int | None) -> Completion:
        cfg = self.cfg
        for attempt in range(1, cfg.max_retries + 2):
            if ep.down:
                raise EndpointDown(ep.policy.name)
            # The endpoint's slot is taken before the global one, so a request queued behind a busy
            # endpoint never holds a global slot that another endpoint could use.
            async with ep.slots:
                if ep.down:
                    raise EndpointDown(ep.policy.name)
                async with self.global_slots:
                    ep.requests += 1
                    sent = time.monotonic()
                    try:
                        result = await _in_thread(complete, ep.policy, prompt, cfg.sampling, seed,
                                                  cfg.request_timeout)
                    except RequestFailure as e:
                        failure = e
                    else:
                        ep.ok += 1
                        ep.consecutive_failures, ep.failing_since, ep.refusals_in_a_row = 0, None, 0
                        return result
            ep.errors[failure.kind] += 1
            if not failure.endpoint_fault and not failure.retryable:
                # A server that refuses every request (a hosted API rejecting top_k or seed, max_tokens
                # past its context) failed a prompt per request, and a rerun of those few the same
                # way: refused in a row with no answer between, it is its settings, not the prompts.
                ep.refusals_in_a_row += 1
                if not ep.down and ep.refusals_in_a_row >= cfg.endpoint_max_failures:
                    ep.down_reason = (f"{ep.refusals_in_a_row} requests in a row refused and none answered, last: "
                                      f"{failure} (its settings are refused, not the prompts: check its pool entry)")
                    print(f"polar sample: endpoint {ep.policy.name!r} ({ep.policy.url}) leaves the pool: "
                          f"{ep.down_reason}", file=self.log, flush=True)
                if ep.down:
                    raise EndpointDown(ep.policy.name)
                raise PolicyRefused(f"policy {ep.policy.name!r}: {failure}")
            if failure.endpoint_fault:
                ep.consecutive_failures += 1
                if ep.failing_since is None:
                    ep.failing_since = sent
                # A refusal that is the endpoint's and not retryable (401/403/404: a wrong key, model
                # name or URL) fails every request it will get: counting up to the limit failed a
                # prompt per refusal, and a rerun of those few prompts never reached the limit.
                if not ep.down:  # else taken out by a request that failed beside this one
                    if not failure.retryable:
                        ep.down_reason = f"{failure} (every request to it will fail: check its pool entry)"
                    elif ep.consecutive_failures >= cfg.endpoint_max_failures and (
                            attempt > cfg.max_retries or time.monotonic() - ep.failing_since >= cfg.retry_cap):
                        # The requests in flight to an endpoint fail together when it or a proxy
                        # hiccups: counted alone, that burst took it out for the rest of the run though
                        # every request would have succeeded at its next try. So the failures must also
                        # last a whole backoff (--retry-cap), or use up a request's retries, which
                        # leaves before that request would fail its prompt.
                        ep.down_reason = f"{ep.consecutive_failures} consecutive failures, last: {failure}"
                    if ep.down:
                        print(f"polar sample: endpoint {ep.policy.name!r} ({ep.policy.url}) leaves the pool: "
                              f"{ep.down_reason}", file=self.log, flush=True)
            if ep.down:
                raise EndpointDown(ep.policy.name)
            if not failure.retryable or attempt > cfg.max_retries:
                raise PromptFailed(f"policy {ep.policy.name!r}: {failure} (attempt {attempt})")
            ep.retries += 1
            await asyncio.sleep(backoff_delay(attempt, cfg.retry_base, cfg.retry_cap, self.jitter,
                                              failure.retry_after))
        raise AssertionError("unreachable")

    async def _triplet(self, i: int) -> dict:
        info = self.prompts.make(i)
        order = policy_order(self.cfg.seed, i, self.names)
        have: dict[tuple[str, str], Completion] = {}
        refused: dict[str, PolicyRefused] = {}  # policies that refused this prompt: the next ones take it
        while True:
            live = [n for n in order if not self.endpoints[n].down]
            if len(live) < 2:
                self.stopping = True
                self.stop_reason = "fewer than 2 policies are left in the pool"
                raise PromptFailed(self.stop_reason)
            usable = [n for n in live if n not in refused]
            if len(usable) < 2:
                raise PromptFailed(f"refused by {len(refused)} of the {len(live)} live policies; "
                                   + "; ".join(map(str, refused.values())))
            a, b = usable[0], usable[1]
            wanted = [(a, "reference"), (a, "chosen"), (b, "rejected")]
            missing = [w for w in wanted if w not in have]
            seeds = [request_seed(self.cfg.seed, i, role) if self.cfg.send_seed else None for _, role in missing]
            results = await asyncio.gather(*(self._request(self.endpoints[n], info.text, s)
                                             for (n, _), s in zip(missing, seeds)), return_exceptions=True)
            redraw, failure = False, None
            for w, r in zip(missing, results):
                if isinstance(r, EndpointDown):
                    redraw = True
                elif isinstance(r, PolicyRefused):
                    refused[w[0]], redraw = r, True
                elif isinstance(r, PromptFailed):
                    failure = failure or r
                elif isinstance(r, BaseException):
                    raise r
                else:
                    have[w] = r
            if failure is not None:
                raise failure
            ref = have.get((a, "reference"))
            if ref is not None and not ref.text.strip():
                # A base model may answer only newlines: a record whose reference is only whitespace is one
                # every build rejects (POLAR scores an output against the reference, paper Sec. 3), and it
                # was written as done. Like a refusal, the prompt goes to the next policies of its order.
                refused[a], redraw = PolicyRefused(f"policy {a!r}: its reference is only whitespace "
                                                   f"({ref.text[:20]!r})"), True
            if not redraw:
                break
        texts, cut = {}, []
        for (n, role) in wanted:
            text, removed = truncate_loop(have[(n, role)].text, self.cfg.loop_min_repeats, self.cfg.loop_min_chars)
            texts[role] = text
            if removed:
                cut.append(role)
        self.loops_cut += len(cut)
        return {"prompt": info.text, "reference": texts["reference"], "chosen": texts["chosen"],
                "rejected": texts["rejected"], "wrapper": "pretrain", "id": i, "policy_a": a, "policy_b": b,
                "source": info.source, "doc": info.doc, "prompt_tokens": info.tokens, "truncated_loops": cut,
                "skipped_policies": [n for n in order[:order.index(b)] if n not in (a, b)],
                "finish_reasons": {role: have[w].finish_reason for w, role in zip(wanted, ROLES)}}

    async def _one(self, i: int) -> None:
        try:
            record = await self._triplet(i)
        except PromptFailed as e:
            self.failed += 1
            self._fail_f.write(_json_line({"id": i, "reason": str(e)}))
            self._fail_f.flush()
            return
        if self.stopping and self.stop_reason == "max-records":
            return  # sampled after the requested stop: not written, so the next run does it
        # One write call per record, then flush: a kill leaves at most one torn line, which
        # read_done_ids removes on restart.
        self._out_f.write(_json_line(record))
        self._out_f.flush()
        self.written += 1
        if self.cfg.max_records is not None and self.written >= self.cfg.max_records:
            self.stopping, self.stop_reason = True, "max-records"

    def _progress_line(self, final: bool = False) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        done = self.already_done + self.written
        rate = self.written / elapsed
        remaining = self.cfg.num_prompts - done - self.failed
        if self.cfg.max_records is not None:  # a trial run of a large dataset showed days for minutes
            remaining = min(remaining, self.cfg.max_records - self.written)
        eta = format_duration(remaining / rate) if rate > 0 else "?"
        eps = ", ".join(
            f"{n} {'DOWN' if ep.down else 'ok'}" + (f" ({sum(ep.errors.values())} err)" if ep.errors else "")
            for n, ep in self.endpoints.items())
        head = "done" if final else "sample"
        return (f"{head} {done}/{self.cfg.num_prompts} | {rate:.2f} prompts/s | eta {eta} | failed {self.failed} | "
                f"loops cut {self.loops_cut} | {eps}")

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.progress_interval)
            print(self._progress_line(), file=self.log, flush=True)

    async def run(self, done_ids: set[int]) -> None:
        cfg = self.cfg
        self.endpoints = {p.name: Endpoint(p) for p in self.policies}
        self.global_slots = asyncio.Semaphore(cfg.concurrency)
        self.t0 = time.perf_counter()
        self.already_done = sum(1 for i in done_ids if i < cfg.num_prompts)
        # Each prompt needs up to 3 requests; twice the request slots in prompts keeps every
        # endpoint busy without creating a task per prompt of a large run.
        window = asyncio.Semaphore(2 * cfg.concurrency)
        tasks: set[asyncio.Task] = set()
        reporter = asyncio.create_task(self._report())

        crash: list[BaseException] = []

        def finished(t: asyncio.Task) -> None:
            tasks.discard(t)
            window.release()
            # A bug must stop the run loudly, not vanish as an unretrieved task exception.
            if not t.cancelled() and t.exception() is not None:
                crash.append(t.exception())
                self.stopping, self.stop_reason = True, "internal error"

        with open(self.output, "a", encoding="utf-8") as self._out_f, \
                open(self.failures_path, "w", encoding="utf-8") as self._fail_f:
            try:
                for i in range(cfg.num_prompts):
                    if i in done_ids:
                        continue
                    await window.acquire()
                    if self.stopping:
                        window.release()
                        break
                    t = asyncio.create_task(self._one(i))
                    tasks.add(t)
                    t.add_done_callback(finished)
                while tasks:
                    if self.stopping and self.stop_reason in ("max-records", "internal error"):
                        for t in list(tasks):
                            t.cancel()
                    await asyncio.wait(list(tasks), return_when=asyncio.FIRST_COMPLETED)
                if crash:
                    raise crash[0]
            finally:
                reporter.cancel()
                for t in list(tasks):
                    t.cancel()

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.t0
        done = self.already_done + self.written
        failed = f"{self.failed} prompt{'' if self.failed == 1 else 's'} failed"
        if self.failed:  # the file is there (empty) either way: pointing at it for none misleads
            failed += f" (listed in {self.failures_path}; a rerun retries {'it' if self.failed == 1 else 'them'})"
        lines = [self._progress_line(final=True),
                 f"  this run: {self.written} records in {format_duration(elapsed)}, {failed}, {self.loops_cut} "
                 f"loop{'' if self.loops_cut == 1 else 's'} truncated",
                 f"  output: {self.output} holds {done} of {self.cfg.num_prompts} prompts"]
        not_done = self.cfg.num_prompts - done - self.failed
        if not_done > 0:
            why = ("stopped after --max-records" if self.stop_reason == "max-records"
                   else (self.stop_reason or "stopped"))
            lines.append(f"  {not_done} prompts not attempted: {why}; a rerun continues")
        for n, ep in self.endpoints.items():
            errs = ", ".join(f"{k} x{v}" for k, v in sorted(ep.errors.items())) or "no errors"
            state = f"DOWN ({ep.down_reason})" if ep.down else "up"
            lines.append(f"  {n}: {ep.ok}/{ep.requests} requests ok, {ep.retries} retries, {errs}; {state}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def _load_tokenizer(spec: str):
    from polar.tokenizer import load_tokenizer

    try:
        return load_tokenizer(spec)
    except (OSError, ValueError, ImportError) as e:
        raise SampleError(f"--tokenizer {spec!r}: {e}") from None


def _log(line: str) -> None:
    print(f"polar sample: {line}", file=sys.stderr, flush=True)


async def _until_stopped(sampler: Sampler, done: set[int]) -> bool:
    """sampler.run; True when SIGTERM stopped it. A scheduler's stop (Slurm at the time limit,
    Kubernetes, kill) is SIGTERM, which ended the run at once, without its summary or exit status 130:
    it now cancels the run at its next await, as Ctrl-C does. Handled by the loop itself, not passed
    on as SIGINT: a job started in the background (`cmd &`, some launchers) ignores SIGINT, and asyncio
    then leaves it ignored."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        stopped = True
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, stop)
        handled = True
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread: the caller's to handle
        handled = False
    try:
        await sampler.run(done)
    except asyncio.CancelledError:
        if not stopped:
            raise
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGTERM)
    return stopped


def main(argv: list[str]) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    check_args(ap, a)
    lock, made = None, []
    try:
        # The output's place and lock come before the prompt files, whose check reads every line (minutes
        # for tens of GB): a second run on a busy output, or an output where nothing can be written, was
        # told so only after that check.
        failures = a.failures or a.output + ".failures.jsonl"
        for flag, path in (("--output", a.output), ("--failures", failures)):
            if os.path.isdir(path):
                raise SampleError(f"{flag} {path}: is a directory; name a JSONL file")
            # the failures file's directory was not made, and a parent that is a file was not named:
            # the run stopped with a traceback
            parent = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(parent, exist_ok=True)
            except FileExistsError:
                raise SampleError(f"{flag} {path}: {parent} is a file, not a directory") from None
            except OSError as e:
                raise SampleError(f"{flag} {path}: cannot make its directory {parent}: {e.strerror or e}") from None
        made = [p for p in (a.output, failures) if not os.path.exists(p)]
        # before the settings record, which a second run with other settings would overwrite
        lock = lock_output(a.output)
        try:  # the run opens it once its prompts are ready: there, a failure was a traceback
            open(failures, "a").close()
        except OSError as e:
            raise SampleError(f"--failures {failures}: cannot write: {e.strerror or e}") from None
        policies = load_pool(a.pool)
        tokenizer = _load_tokenizer(a.tokenizer)
        corpus = TextSource(a.corpus, a.corpus_format, a.text_field, _log, a.progress_interval, "--corpus")
        if not len(corpus):
            raise SampleError(f"--corpus {' '.join(a.corpus)}: no non-empty documents")
        instructions = None
        if a.instruction_prompts:
            instructions = TextSource(a.instruction_prompts, a.corpus_format, a.instruction_field, _log,
                                      a.progress_interval, "--instruction-prompts")
            if not len(instructions):
                raise SampleError(f"--instruction-prompts {' '.join(a.instruction_prompts)}: no non-empty prompts")
        sampling = SamplingParams(a.temperature, a.top_p, a.top_k, a.max_tokens)
        settings = record_settings(a, policies, sampling, corpus, instructions)
        check_settings(a.output + ".run.json", settings, a.allow_changed_settings, _log)
        done = read_done_ids(a.output, _log, a.progress_interval)
    except (SampleError, PoolError) as e:
        if lock is not None:
            for path in made:  # made empty by this run, which stops before its first prompt (a bad corpus)
                if os.path.exists(path) and not os.path.getsize(path):
                    os.remove(path)
            os.close(lock)
        print(f"polar sample: error: {e}", file=sys.stderr)
        return 2
    print(f"polar sample: {len(corpus)} corpus documents ({corpus.empty} empty lines skipped)"
          + (f", {len(instructions)} instruction prompts ({instructions.empty} empty skipped)" if instructions else "")
          + f", {len(policies)} policies; {sum(1 for i in done if i < a.num_prompts)} of {a.num_prompts} "
            f"prompts already in {a.output}", file=sys.stderr, flush=True)
    cfg = RunConfig(num_prompts=a.num_prompts, seed=a.seed, sampling=sampling, send_seed=not a.no_request_seed,
                    concurrency=a.concurrency, request_timeout=a.request_timeout, max_retries=a.max_retries,
                    retry_base=a.retry_base, retry_cap=a.retry_cap, endpoint_max_failures=a.endpoint_max_failures,
                    loop_min_repeats=a.loop_min_repeats, loop_min_chars=a.loop_min_chars,
                    progress_interval=a.progress_interval, max_records=a.max_records)
    prompts = PromptMaker(a.seed, tokenizer, corpus, instructions, a.instruction_share,
                          a.prefix_min_tokens, a.prefix_max_tokens)
    sampler = Sampler(cfg, prompts, policies, a.output, failures)
    interrupted = False
    try:
        interrupted = asyncio.run(_until_stopped(sampler, done))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        corpus.close()
        if instructions:
            instructions.close()
        os.close(lock)
    if hasattr(sampler, "t0"):
        print(sampler.summary(), file=sys.stderr, flush=True)
    if interrupted:
        print("polar sample: interrupted; the same command continues", file=sys.stderr)
        return 130
    return 1 if sampler.failed or (sampler.stop_reason and sampler.stop_reason != "max-records") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
