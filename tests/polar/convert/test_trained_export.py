"""The whole path a user takes: a transformers checkpoint -> `polar convert hf-to-engine` -> a few
steps of `polar finetune` -> `polar convert engine-to-hf` -> the exported model scores in
transformers exactly as `polar score` scores the trained engine checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.polar.convert.helpers import ROOT
from tests.polar.convert.tiny_models import WORDS, llama_config, random_seq_cls, save

pytest.importorskip("transformers")


def run(*args, cwd):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, cwd=cwd,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, f"{args[:3]}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def convert(*args):
    """`polar convert ...` in this process, as the other conversion tests run it: a conversion joins the
    runtime a process already has, and an interpreter of its own costs seconds of imports."""
    from polar import cli

    assert cli.main(["convert", *map(str, args)]) == 0


def sentence(rng, n):
    return " ".join(rng.choice(WORDS, size=n))


def test_convert_finetune_export_scores_the_same_in_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from polar.client_format import client_encode_batch
    from polar.tokenizer import load_tokenizer

    src = save(random_seq_cls(llama_config("llama")), tmp_path / "hf_src")
    base = tmp_path / "base"
    convert("hf-to-engine", src, base)

    rng = np.random.default_rng(3)
    with open(tmp_path / "prefs.jsonl", "w") as f:
        for _ in range(48):
            f.write(json.dumps({"prompt": sentence(rng, 4), "reference": sentence(rng, 5),
                                "chosen": sentence(rng, 3), "rejected": sentence(rng, 6)}) + "\n")
    run(str(ROOT / "engine" / "finetune.py"), "--config", str(base / "model.yaml"),
        f"checkpoint.init_from={base}", f"finetune.train={tmp_path / 'prefs.jsonl'}", "finetune.eval_fraction=0",
        "finetune.epochs=3", "train.lr=5e-3", "train.global_batch=2", "data.seq_length=128",
        "log.tensorboard=false", "train.eval_interval=0", f"run_dir={tmp_path / 'ft'}", cwd=tmp_path)

    out = tmp_path / "hf_out"
    # neither the export nor the scoring is told the tokenizer: the fine-tuning run carries it
    assert (tmp_path / "ft" / "checkpoints" / "tokenizer" / "tokenizer.json").is_file()
    convert("engine-to-hf", tmp_path / "ft" / "checkpoints", out)

    items = [{"prompt": sentence(rng, 4), "reference": sentence(rng, 5), "output": sentence(rng, k)}
             for k in (0, 2, 5, 7)]
    inp = tmp_path / "items.jsonl"
    inp.write_text("".join(json.dumps(it) + "\n" for it in items))
    scored = tmp_path / "scored.jsonl"
    run("-m", "polar.cli", "score", "--checkpoint", str(tmp_path / "ft" / "checkpoints"), "--input", str(inp),
        "--output", str(scored), cwd=tmp_path)
    engine_rewards = np.array([json.loads(x)["reward"] for x in scored.read_text().splitlines()])

    tok = load_tokenizer(str(base / "tokenizer"))
    model = AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        hf_rewards = np.array([model(input_ids=torch.tensor([s.ids.tolist()])).logits[0, 0].item()
                               for s in client_encode_batch(tok, items)])
    # the fine-tuning moved the weights away from the imported ones (the test compares a trained model)
    start = AutoModelForSequenceClassification.from_pretrained(str(src), dtype=torch.float32)
    assert not torch.equal(start.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)
    np.testing.assert_allclose(hf_rewards, engine_rewards, rtol=1e-4, atol=1e-5)
