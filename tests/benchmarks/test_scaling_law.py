"""benchmarks/scaling_law.py's arithmetic: the power-law fit, the compute frontier, the token and
FLOP sums read back from a run's log, and the non-embedding parameter count of each rung against
the engine's real model, the seed average, the reuse of finished runs, and the number of evaluations
a run makes. The study itself (about 23 minutes on 2 cores) is run by hand; its figures live in
benchmarks/RESULTS.md."""
import argparse
import json
import os
import sys
import warnings

import numpy as np
import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from benchmarks import scaling_law as sl  # noqa: E402


def test_power_fit_recovers_a_known_law():
    n = np.geomspace(2e4, 1e6, 5)
    a, b, r2 = sl.power_fit(n, 0.9 * n ** -0.0425)
    assert a == pytest.approx(0.9, rel=1e-9) and b == pytest.approx(-0.0425, rel=1e-9)
    assert r2 == pytest.approx(1.0, abs=1e-12)


def test_power_fit_r2_drops_with_scatter():
    n = np.geomspace(2e4, 1e6, 5)
    wobble = np.array([1.0, 1.03, 0.97, 1.03, 0.97])
    _, b, r2 = sl.power_fit(n, 0.9 * n ** -0.0425 * wobble)
    assert b < 0 and 0 < r2 < 0.95  # scatter as large as the trend fails the acceptance bar


def test_frontier_keeps_only_points_no_cheaper_point_beats():
    pts = [(1.0, 0.70), (2.0, 0.72), (3.0, 0.60), (4.0, 0.65), (5.0, 0.50), (5.0, 0.55)]
    assert sl.compute_frontier(pts) == [(1.0, 0.70), (3.0, 0.60), (5.0, 0.50)]


def test_curve_sums_tokens_and_flops_from_interval_rates():
    # two logged intervals of 10 steps: rate x (step time x steps) gives back each interval's counts
    history = [
        {"step": 10, "loss": 0.69, "tokens_per_s": 1000.0, "tflops_per_s": 0.5, "step_time_s": 0.2},
        {"step": 10, "eval": "held_out", "loss": 0.68, "pair_accuracy": 0.55, "lm_loss": 3.0},
        {"step": 10, "eval": "seen", "loss": 0.60, "pair_accuracy": 0.60},
        {"step": 20, "loss": 0.60, "tokens_per_s": 2000.0, "tflops_per_s": 1.0, "step_time_s": 0.1},
    ]
    summary = {"history": history, "steps": 20,
               "evaluations": {"held_out": {"loss": 0.55, "pair_accuracy": 0.7, "pairs": 8, "lm_loss": 2.5}}}
    pts = sl.curve(summary)
    assert [p["step"] for p in pts] == [10, 20]
    assert pts[0]["tokens"] == pytest.approx(2000.0) and pts[0]["flops"] == pytest.approx(1e12)
    assert pts[1]["tokens"] == pytest.approx(4000.0) and pts[1]["flops"] == pytest.approx(2e12)
    assert [p["loss"] for p in pts] == [0.68, 0.55] and pts[1]["lm_loss"] == 2.5


@pytest.mark.parametrize("rung", [s for s in sl.LADDER if s.name in ("w16", "w32", "w80", "xl")], ids=lambda s: s.name)
def test_non_embedding_count_matches_the_engine_model(rung):
    warnings.filterwarnings("ignore")
    from engine.config import ModelConfig, ParallelConfig, TrainConfig
    from engine.parallelize import build_chunks, count_parameters
    from engine.runtime import current_or_new_runtime

    rt = current_or_new_runtime(ParallelConfig(), seed=0)
    vocab = sl.ByteTokenizer.vocab_size
    model = ModelConfig(num_layers=rung.layers, hidden_size=rung.hidden, num_attention_heads=rung.heads,
                        num_query_groups=rung.kv_heads, ffn_hidden_size=rung.ffn, vocab_size=vocab)
    chunks, _ = build_chunks(model, ParallelConfig(), TrainConfig(precision="fp32", aux_lm_weight=1.0), rt)
    total = count_parameters(chunks)
    embedding = sum(p.numel() for c in chunks for name, p in c.named_parameters()
                    if "embedding" in name or "lm_head" in name)
    assert embedding == 2 * vocab * rung.hidden
    assert rung.non_embedding_parameters(total, vocab, lm_head=True) == total - embedding


def test_mean_curve_averages_seeds_point_by_point():
    a = [{"step": 5, "tokens": 10.0, "loss": 0.6}, {"step": 9, "tokens": 20.0, "loss": 0.4, "pairs": 8}]
    b = [{"step": 5, "tokens": 12.0, "loss": 0.7}, {"step": 9, "tokens": 22.0, "loss": 0.2, "pairs": 8}]
    out = sl.mean_curve([a, b])
    assert [p["step"] for p in out] == [5, 9]
    assert out[0]["loss"] == pytest.approx(0.65) and out[1]["loss"] == pytest.approx(0.3)
    assert out[1]["tokens"] == pytest.approx(21.0) and out[1]["pairs"] == 8
    with pytest.raises(ValueError, match="different steps"):
        sl.mean_curve([a, b[:1]])


def test_one_seed_left_out_refits_the_other_seeds_means():
    n = [1e4, 2e4, 4e4]
    losses = {1: [0.60, 0.45, 0.30], 2: [0.62, 0.40, 0.33], 3: [0.58, 0.50, 0.20]}
    rows = [{"non_embedding": x, "seeds": [1, 2, 3], "seed_losses": [losses[sd][i] for sd in (1, 2, 3)]}
            for i, x in enumerate(n)]
    rows[2] = {**rows[2], "seeds": [1, 2], "seed_losses": [0.30, 0.33]}  # seed 3's largest run failed
    got = dict(sl.leave_one_seed_out(rows))
    assert sorted(got) == [1, 2, 3]
    expect = {1: [0.60, 0.45, 0.33], 2: [0.59, 0.475, 0.30], 3: [0.61, 0.425, 0.315]}
    for seed, means in expect.items():
        assert got[seed] == pytest.approx(sl.power_fit(n, means)[2], abs=1e-12)
    assert len({round(r2, 6) for r2 in got.values()}) == 3  # each seed moves the fit its own way


def test_a_finished_run_is_reused_only_for_the_same_command(tmp_path, monkeypatch):
    args = argparse.Namespace(
        tokens=2e4, batch=4, seq=512, micro_batch=4, eval_points=2, log_interval=1, eval_triplets=8,
        overrides=[], threads=1, fresh=False)
    size, run_dir = sl.LADDER[0], tmp_path / "xs-seed1234"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"steps": 10}')
    (run_dir / "command.json").write_text(json.dumps(sl.train_command(size, 1234, args, run_dir)[1:]))

    def no_training(*a, **k):
        raise RuntimeError("would train")

    monkeypatch.setattr(sl.subprocess, "Popen", no_training)
    assert sl.run_size(size, 1234, args, run_dir) == {"steps": 10}
    with pytest.raises(RuntimeError, match="would train"):  # another seed: another command
        sl.run_size(size, 1235, args, run_dir)
    assert not (run_dir / "summary.json").exists()  # the stale run was cleared before retraining


def test_first_seed_draws_a_replicate_with_its_own_run_directories(tmp_path, monkeypatch):
    trained = []

    def record(size, seed, args, run_dir):
        trained.append((size.name, seed, run_dir.name))
        return {"error": "not trained in this test"}

    monkeypatch.setattr(sl, "run_size", record)
    assert sl.main(["--sizes", "w32", "w48", "--seeds", "2", "--first-seed", "1237", "--out", str(tmp_path)]) == 1
    assert sorted(trained) == [("w32", 1237, "w32-seed1237"), ("w32", 1238, "w32-seed1238"),
                               ("w48", 1237, "w48-seed1237"), ("w48", 1238, "w48-seed1238")]


@pytest.mark.parametrize("tokens,points", [(5e6, 6), (1e7, 6), (2e5, 5), (2e5, 2), (4096, 6)])
def test_each_run_evaluates_eval_points_times_the_final_one_included(tokens, points):
    # the trainer evaluates at every multiple of train.eval_interval below train.steps, then once at the end
    args = argparse.Namespace(tokens=tokens, batch=16, seq=512, micro_batch=4, eval_points=points, log_interval=10,
                              eval_triplets=8, overrides=[])
    cmd = dict(a.split("=", 1) for a in sl.train_command(sl.LADDER[0], 1234, args, sl.ROOT)[2:])
    steps, interval = int(cmd["train.steps"]), int(cmd["train.eval_interval"])
    assert len(range(interval, steps, interval)) + 1 == min(points, steps)
