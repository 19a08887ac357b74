"""Every endpoint's rewards equal `polar score`'s (engine/score.py, the offline reference) for the
same items, fp32 on CPU: the server formats items exactly as the official client does and shares
prefixes across requests, and neither may change a reward."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np

from tests.polar.serve.conftest import ROOT, live_server

ITEMS = [
    {"prompt": "Tell me a story", "reference": "Once upon a time there was a fox.", "output": "A fox lived once."},
    {"prompt": "Tell me a story", "reference": "Once upon a time there was a fox.", "output": ""},
    {"prompt": "Tell me a story", "reference": "Once upon a time there was a fox.", "output": "Bears, mostly."},
    {"prompt": [{"role": "user", "content": "2+2?"}], "reference": "4", "output": "four <|reward|> 4",
     "wrapper": "pretrain"},
    {"prompt": "émoji 🦊 test", "reference": "ü" * 40, "output": "🦊" * 5},
]


def test_v1_rewards_classify_and_pooling_equal_polar_score(checkpoint_dir, scorer, tokenizer, tmp_path):
    inp, out = tmp_path / "items.jsonl", tmp_path / "rewards.jsonl"
    inp.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    proc = subprocess.run([sys.executable, "-m", "polar.cli", "score", "--checkpoint", checkpoint_dir,
                           "--input", str(inp), "--output", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = np.array([json.loads(x)["reward"] for x in out.read_text().splitlines()])

    from polar.client_format import client_encode_batch

    texts = [s.text for s in client_encode_batch(tokenizer, ITEMS)]
    with live_server(scorer, tokenizer) as (url, _):
        native = httpx.post(f"{url}/v1/rewards", json={"items": ITEMS}, timeout=120).json()
        classify = httpx.post(f"{url}/classify", json={"model": "polar", "text": texts}, timeout=120).json()
        pooling = httpx.post(f"{url}/pooling", json={"input": texts}, timeout=120).json()
    got = {
        "native": [d["reward"] for d in sorted(native["data"], key=lambda d: d["index"])],
        "classify": [d["embedding"][0] for d in classify],
        "pooling": [d["data"][-1][0] for d in pooling["data"]],
    }
    for name, values in got.items():
        np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-5, err_msg=name)
