"""One blocking request to an OpenAI-compatible completion endpoint, with its errors classified.

Standard library only (urllib); `polar sample` runs these calls in threads and does the retrying,
so this module only says *what* went wrong:

    retryable        connection refused/reset, timeouts, HTTP 5xx, 408, 429, a reply that is not
                     the API's JSON, an empty completion or one holding a lone surrogate: the same
                     request may succeed later
    endpoint_fault   the endpoint, not the prompt, is at fault (everything retryable except 429
                     and an unusable completion, plus 401/403/404: a wrong key, model name or URL fails
                     every request): these count towards taking the endpoint out of the pool. A 429
                     only asks us to slow down, and an empty completion is the answer to one prompt.
    neither          other 4xx (400 prompt too long, 422 bad parameter): this prompt fails here
"""
from __future__ import annotations

import datetime
import email.utils
import http.client
import json
import math
import random
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlparse

from polar.format import lone_surrogate
from polar.policy_pool import Policy


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50  # not in the OpenAI API; vLLM and SGLang read it from the request body
    max_tokens: int = 4096


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None


class RequestFailure(Exception):
    def __init__(self, kind: str, message: str, retryable: bool, endpoint_fault: bool,
                 retry_after: float | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind  # short label for the per-endpoint error counts, e.g. "http 500"
        self.retryable = retryable
        self.endpoint_fault = endpoint_fault
        self.retry_after = retry_after


_LOOPBACK = ("localhost", "127.0.0.1", "::1")
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_via_env = urllib.request.build_opener()  # honours http(s)_proxy / no_proxy


def _opener(url: str):
    # A proxy set for the outside world must not capture a server on this machine.
    host = urlparse(url).hostname or ""
    return _direct if host in _LOOPBACK or host.startswith("127.") else _via_env


def request_body(policy: Policy, prompt: str, params: SamplingParams, seed: int | None) -> dict:
    body = {"model": policy.model, "max_tokens": params.max_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "top_k": params.top_k, "n": 1, "stream": False}
    if seed is not None:
        body["seed"] = seed
    if policy.kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def retry_after(headers) -> float | None:
    """Seconds the server asks us to wait: Retry-After is a number of seconds or an HTTP date (RFC
    9110), which proxies and gateways send; ignoring the date retried within milliseconds."""
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        seconds = float(value)
        if not 0 <= seconds < math.inf:  # a proxy's negative, NaN or infinite one: our own backoff decides
            return None
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):  # neither form: our own backoff decides
            return None
        if when.tzinfo is None:  # "-0000": a date in UTC without a stated zone
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    return max(0.0, seconds)  # a date already past: now


def _http_failure(code: int, detail: str, headers) -> RequestFailure:
    kind = f"http {code}"
    if code == 429:
        return RequestFailure(kind, detail, retryable=True, endpoint_fault=False, retry_after=retry_after(headers))
    if code >= 500 or code == 408:
        return RequestFailure(kind, detail, retryable=True, endpoint_fault=True, retry_after=retry_after(headers))
    if code in (401, 403, 404):
        return RequestFailure(kind, detail, retryable=False, endpoint_fault=True)
    return RequestFailure(kind, detail, retryable=False, endpoint_fault=False)


def parse_reply(policy: Policy, raw: bytes) -> Completion:
    try:
        reply = json.loads(raw)
        choice = reply["choices"][0]
        text = choice["message"]["content"] if policy.kind == "chat" else choice["text"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise RequestFailure("bad response", f"not an OpenAI {policy.kind} reply: {raw[:200]!r}",
                             retryable=True, endpoint_fault=True) from None
    if not isinstance(text, (str, type(None))):
        raise RequestFailure("bad response", f"completion text is {type(text).__name__}, not a string",
                             retryable=True, endpoint_fault=True)
    if not text:  # "", or the null content chat servers send for an empty message
        # A record with an empty response is one every build rejects; a failure is retried, and
        # listed for the next run, instead of marking the prompt done.
        raise RequestFailure("empty completion", f"the server returned no text (finish_reason "
                             f"{choice.get('finish_reason')!r})", retryable=True, endpoint_fault=False)
    found = lone_surrogate(text)
    if found:
        # JSON can escape one ("\ud800") but it is no character: a record holding it is one every
        # build rejects, so, like an empty completion, the prompt fails here and is retried.
        raise RequestFailure("invalid text", f"the completion holds a lone surrogate ({found})",
                             retryable=True, endpoint_fault=False)
    return Completion(text=text, finish_reason=choice.get("finish_reason"))


def complete(policy: Policy, prompt: str, params: SamplingParams, seed: int | None,
             timeout: float) -> Completion:
    """One attempt; raises RequestFailure for anything but a usable completion."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    key = policy.api_key()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(request_body(policy, prompt, params, seed)).encode("utf-8")
    req = urllib.request.Request(policy.url, data=data, headers=headers, method="POST")
    try:
        with _opener(policy.url).open(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        try:
            detail = e.read()[:300].decode("utf-8", "replace")
        except Exception:  # the error body is only for the message
            detail = ""
        raise _http_failure(e.code, detail or str(e.reason), e.headers) from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise RequestFailure("timeout", f"no reply within {timeout:g}s", True, True) from None
        raise RequestFailure("connection", str(reason), True, True) from None
    except (socket.timeout, TimeoutError):
        raise RequestFailure("timeout", f"no reply within {timeout:g}s", True, True) from None
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        raise RequestFailure("connection", f"{type(e).__name__}: {e}", True, True) from None
    return parse_reply(policy, raw)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random,
                  retry_after: float | None = None) -> float:
    """Seconds to wait before retry `attempt` (1-based): full jitter on an exponential ceiling.

    Full jitter (a uniform draw below the ceiling) spreads the retries of many requests that
    failed together, instead of sending them back at the same instant. A server's Retry-After is a
    floor, capped like the rest.
    """
    # the exponent is bounded: base * 2.0 ** 1024 overflows a float (a run with --max-retries past 1024)
    delay = rng.uniform(0, min(cap, base * 2 ** min(attempt - 1, 60)))
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay
