"""Shared by the conversion tests: POLAR-shaped groups, engine scoring of a converted checkpoint,
and a transformers reference that scores each input unpacked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("score_worker.py")


def polar_groups(tok, texts: list[tuple[str, str, list[str]]]):
    """(prompt, reference, candidates) -> engine Groups of the sft wrapper: prefix
    [BOS] prompt\\n reference <|reward|> prompt\\n, candidate = text + reward token."""
    from engine.packing import Group

    groups = []
    for prompt, reference, cands in texts:
        prefix = np.concatenate([[tok.bos_id], tok.encode(f"{prompt}\n{reference}"), [tok.reward_sep_id],
                                 tok.encode(f"{prompt}\n")]).astype(np.int32)
        cand_ids = [np.concatenate([tok.encode(c), [tok.reward_token_id]]).astype(np.int32) for c in cands]
        labels = np.zeros(len(cands), dtype=np.int8)
        labels[0] = 1
        groups.append(Group(prefix=prefix, candidates=cand_ids, labels=labels))
    return groups


def random_groups(seed: int, n: int, vocab_lo: int, vocab_hi: int, end_id: int, k_max: int = 3):
    from engine.packing import Group

    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(n):
        k = int(rng.integers(2, k_max + 1))
        prefix = rng.integers(vocab_lo, vocab_hi, size=int(rng.integers(2, 12)), dtype=np.int32)
        cands = [np.append(rng.integers(vocab_lo, vocab_hi, size=int(rng.integers(0, 6)), dtype=np.int32), end_id)
                 for _ in range(k)]
        labels = np.zeros(k, dtype=np.int8)
        labels[0] = 1
        groups.append(Group(prefix=prefix, candidates=cands, labels=labels))
    return groups


def pack(groups, per_sequence: list[int], pad_id: int):
    """Groups split into sequences of the given group counts, one PackedBatch per sequence (the
    pipeline's micro-batch size 1), each of the length of the longest sequence."""
    from engine.packing import collate

    seqs, i = [], 0
    for n in per_sequence:
        seqs.append(groups[i:i + n])
        i += n
    assert i == len(groups)
    length = max(sum(len(g) for g in s) for s in seqs)
    return [collate([s], length, pad_id) for s in seqs]


def unpacked_inputs(groups) -> list[list[int]]:
    return [np.concatenate([g.prefix, c]).tolist() for g in groups for c in g.candidates]


def engine_scores(dst, groups, per_sequence, pad_id: int) -> torch.Tensor:
    """Scores in this process at TP1/PP1 (the runtime is shared by the test session)."""
    from engine import checkpoint, checkpoint_load
    from engine.scoring import score
    from polar.convert.engine_io import build, read_model_config

    model = read_model_config(Path(dst) / "model.yaml")
    chunks, rt = build(model)
    checkpoint_load.load(checkpoint.latest(str(dst)), chunks)
    return score(chunks, pack(groups, per_sequence, pad_id), rt)


def engine_lm_loss(chunks, batches) -> torch.Tensor:
    """The summed next-token loss of an engine model built with its LM head (PP1), over packed batches."""
    with torch.no_grad():
        total = torch.zeros((), dtype=torch.float64)
        for b in batches:
            out = chunks[0](b.tokens, b.layout, b.reward_index)
            total += out[b.reward_index.numel():].sum().double()
    return total


def hf_lm_loss(model, groups) -> torch.Tensor:
    """The same sum from a transformers causal LM, each candidate its own input: every prefix token
    after the first predicted once per group, every candidate token after the candidate's first
    predicted from the prefix and the candidate so far (the token after the prefix differs per
    candidate, so it is no target)."""
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for g in groups:
            p = len(g.prefix)
            for i, c in enumerate(g.candidates):
                ids = torch.tensor([np.concatenate([g.prefix, c]).tolist()])
                ce = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1].double(), ids[0, 1:],
                                                       reduction="none")
                total += ce[p:].sum() + (ce[:p - 1].sum() if i == 0 else 0)
    return total


def hf_scores(model, inputs: list[list[int]]) -> torch.Tensor:
    """Each input scored on its own (no padding) by a transformers sequence classifier."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([ids])).logits[0, 0].float() for ids in inputs])


def engine_scores_torchrun(tmp: Path, dst, groups, per_sequence, pad_id: int, nproc: int, *layout: str):
    """Scores under torchrun at a parallel layout (score_worker.py); rewards as seen by every rank."""
    import pickle

    data = tmp / "groups.pkl"
    data.write_bytes(pickle.dumps({"groups": groups, "per_sequence": per_sequence, "pad_id": pad_id}))
    out = tmp / f"rewards_{'_'.join(layout) or 'tp1'}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           "--ckpt", str(dst), "--data", str(data), "--out", str(out), *layout]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def check_scores(dst: Path, reference, seed: int = 0, per_sequence=(2, 3), rtol: float = 1e-5):
    """The converted checkpoint's rewards at TP1/PP1 against `reference`'s (a transformers sequence
    classifier) on random groups over the tiny test vocabulary; returns the groups and the rewards."""
    from polar.convert.tokenizer_files import load as load_tokenizer
    from tests.polar.convert import tiny_models as tm

    tok = load_tokenizer(Path(dst) / "tokenizer")
    groups = random_groups(seed, sum(per_sequence), 5, tm.len_vocab(), tok.reward_token_id)
    got = engine_scores(dst, groups, list(per_sequence), tok.pad_id)
    want = hf_scores(reference, unpacked_inputs(groups))
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max())
    return groups, got
