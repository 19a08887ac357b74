"""The model card of an `engine-to-hf` export says how to serve it so that POLAR's reward client gets the
raw reward: vLLM's one-label classifier ends in a sigmoid unless `use_activation` is off, and the client
reads /pooling token-wise (the `token_classify` task); SGLang's /classify needs --is-embedding."""
from __future__ import annotations

import json
import shlex

import pytest

pytest.importorskip("transformers", reason="pip install transformers safetensors")

from polar.convert import engine_to_hf, hf_to_engine  # noqa: E402
from tests.polar.convert import tiny_models as tm  # noqa: E402

QUIET = {"log": lambda *a: None}


def _vllm_pooler_configs(card: str) -> list[dict]:
    """The --pooler-config JSON of every `vllm serve` command in the card, continuation lines joined."""
    text = card.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.startswith("vllm serve"):
            words = shlex.split(line)
            out.append(json.loads(words[words.index("--pooler-config") + 1]))
    return out


def test_hf_card_serves_the_raw_reward(tmp_path):
    ref = tm.random_seq_cls(tm.llama_config("llama"))
    src = tm.save(ref, tmp_path / "src")
    dst = hf_to_engine.convert(src, tmp_path / "engine", **QUIET)
    card = (engine_to_hf.convert(dst, tmp_path / "hf", **QUIET) / "README.md").read_text()
    configs = _vllm_pooler_configs(card)
    assert configs, "no vllm serve command in the card"
    assert all(c.get("use_activation") is False for c in configs), configs
    # the newest vLLM takes the task of a task-less /pooling request from the server's PoolerConfig
    assert {"task": "token_classify", "use_activation": False} in configs
    assert "--is-embedding" in card and "/classify" in card
