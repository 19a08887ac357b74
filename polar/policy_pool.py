"""The policy pool of `polar sample`: OpenAI-compatible endpoints listed in a YAML file.

    - name: llama3-8b-base              # optional, defaults to `model`; must be unique
      base_url: http://10.0.0.5:8000/v1 # requests go to {base_url}/completions or /chat/completions
      model: meta-llama/Meta-Llama-3-8B # the `model` field sent with each request
      api_key_env: VLLM_API_KEY         # optional: environment variable holding the bearer token
      max_concurrency: 32               # optional: requests in flight to this endpoint (default 16)
      kind: completions                 # optional: completions (default) or chat

`base_url` follows the OpenAI client convention (it includes the `/v1`), so the same value works
for vLLM, SGLang and hosted APIs. A policy is one entry: POLAR draws two *different* policies per
prompt, and two entries count as different policies even if they serve the same weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse

import yaml

from engine.yaml_load import safe_load

KINDS = ("completions", "chat")
DEFAULT_MAX_CONCURRENCY = 16
_FIELDS = {"name", "base_url", "model", "api_key_env", "max_concurrency", "kind"}


class PoolError(ValueError):
    """A policy pool file that cannot be used; the message names the file, entry and field."""


@dataclass(frozen=True)
class Policy:
    name: str
    base_url: str
    model: str
    api_key_env: str | None = None
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    kind: str = "completions"

    @property
    def url(self) -> str:
        return f"{self.base_url}/{'chat/completions' if self.kind == 'chat' else 'completions'}"

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


def _entry_label(path: str, line: int | None, i: int, raw) -> str:
    name = (raw.get("name") or raw.get("model")) if isinstance(raw, dict) else None
    label = f"{path}:{line}: entry {i}" if line else f"{path}: entry {i}"
    return label + (f" ({name!r})" if isinstance(name, str) else "")


def _entry_lines(text: str) -> list[int]:
    """Line (from 1) where each entry of the pool's list starts: "entry 37", counted from 0, of a pool
    of dozens of endpoints left the reader counting entries by hand."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:  # safe_load has read it; a line is a help, never a reason to fail
        return []
    if isinstance(node, yaml.MappingNode):
        node = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == "policies"), None)
    if not isinstance(node, yaml.SequenceNode):
        return []
    return [item.start_mark.line + 1 for item in node.value]


def parse_policy(raw, where: str) -> Policy:
    """One pool entry; `where` prefixes every error message."""
    if not isinstance(raw, dict):
        raise PoolError(f"{where}: expected a mapping with base_url and model, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - _FIELDS)
    if unknown:
        raise PoolError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_FIELDS))}")

    def text(field: str, required: bool) -> str | None:
        value = raw.get(field)
        if value is None:
            if required:
                raise PoolError(f"{where}: field '{field}' is required")
            return None
        if not isinstance(value, str) or not value.strip():
            raise PoolError(f"{where}: field '{field}' must be a non-empty string, got {value!r}")
        return value.strip()

    base_url = text("base_url", True).rstrip("/")
    parsed = urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise PoolError(f"{where}: field 'base_url' must be an http(s) URL such as "
                        f"http://host:8000/v1, got {base_url!r}")
    model = text("model", True)
    name = text("name", False) or model
    api_key_env = text("api_key_env", False)
    if api_key_env is not None and api_key_env not in os.environ:
        # Checked up front: otherwise every request would fail with 401 and the endpoint would be
        # dropped from the pool minutes into the run.
        raise PoolError(f"{where}: field 'api_key_env' names {api_key_env!r}, which is not set in the environment")
    if api_key_env is not None and not os.environ[api_key_env].strip():
        # `export KEY=` or a .env line left blank: no key was sent, and a server wanting one took the
        # endpoint out of the pool at its first request
        raise PoolError(f"{where}: field 'api_key_env' names {api_key_env!r}, which is set but empty")
    conc = raw.get("max_concurrency", DEFAULT_MAX_CONCURRENCY)
    if isinstance(conc, bool) or not isinstance(conc, int) or conc < 1:
        raise PoolError(f"{where}: field 'max_concurrency' must be a positive integer, got {conc!r}")
    kind = raw.get("kind", "completions")
    if kind not in KINDS:
        raise PoolError(f"{where}: field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    return Policy(name=name, base_url=base_url, model=model, api_key_env=api_key_env,
                  max_concurrency=conc, kind=kind)


def load_pool(path: str) -> list[Policy]:
    """The validated pool in file order; at least two policies with distinct names."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
        data = safe_load(text, str(path))
    except UnicodeDecodeError as e:  # was a traceback from inside the YAML reader
        line = raw[:e.start].count(b"\n") + 1
        raise PoolError(f"{path}:{line}: not valid UTF-8") from None
    except OSError as e:
        raise PoolError(f"{path}: cannot read the policy pool: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise PoolError(f"{path}: not valid YAML: {e}") from None
    # A top-level `policies:` key is accepted too, so a pool can sit next to other settings.
    if isinstance(data, dict) and "policies" in data:
        data = data["policies"]
    if not isinstance(data, list):
        raise PoolError(f"{path}: expected a YAML list of endpoints, got {type(data).__name__}")
    policies, seen, lines = [], {}, _entry_lines(text)
    for i, raw in enumerate(data):
        where = _entry_label(path, lines[i] if i < len(lines) else None, i, raw)
        p = parse_policy(raw, where)
        if p.name in seen:
            raise PoolError(f"{where}: field 'name' {p.name!r} repeats entry {seen[p.name]}; give each "
                            f"entry a distinct name (two servers of one model are two entries with names)")
        seen[p.name] = i
        policies.append(p)
    if len(policies) < 2:
        raise PoolError(f"{path}: POLAR needs at least 2 policies (A != B), the pool has {len(policies)}")
    return policies
