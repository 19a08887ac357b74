"""End-to-end training throughput: the engine against an HF-style reward-model trainer, one table.

    python benchmarks/e2e.py [--cpu] [--tiny] [--steps N] [--json OUT] [-- extra.setting=value ...]

Per model shape, two trainers train on the SAME triplets (prompt + reference, chosen, rejected):
  - the engine: engine/pretrain.py on its synthetic POLAR data (polar/pretrain_recipe.py), each
    triplet one group (the prefix held once, both candidates attending to it), groups packed
    whole into data.seq_length-token sequences, train.global_batch packed sequences per step;
  - the baseline, built the way today's reward-model trainers (TRL RewardTrainer, OpenRLHF) work:
    transformers' LlamaForSequenceClassification (num_labels=1) of the same shape (hidden, layers,
    heads, KV heads, FFN, vocabulary, RoPE base, RMSNorm eps; random init like the engine), each
    candidate its own sequence `prefix + candidate` (the prefix repeated), chosen and rejected of a
    triplet in one right-padded batch with an attention mask, the pad id in the config so the
    score head reads the last real token, loss -log sigmoid(r_chosen - r_rejected), AdamW with the
    engine's lr, betas, eps and weight decay (constant lr), gradient clipping at train.grad_clip,
    `attn_implementation="sdpa"` (and flash_attention_2 where flash_attn imports on a GPU), bf16
    autocast over fp32 weights on a GPU, fp32 on CPU. Each optimizer step trains on exactly the
    triplets of the engine's step with the same number (same packing plan, same seeded order: a
    GlobalBatchLoader with the engine's seed), in micro-batches of --micro-triplets triplets with
    gradient accumulation. The ids of `prefix + candidate` are those the engine reads
    (polar/format.py: prefix + suffix_k is candidate k's full input), truncated by the same rule
    (polar.format.encode_groups with max_length = data.seq_length) and nothing else is dropped:
    a group that does not fit a packed sequence stops the engine run, and both sides take the
    steps' batches in the same order (the engine's ragged tail of an epoch waits for the next).
    `padding_check` (run by the tests) shows that the padded batch gives each candidate the reward
    of its sequence run alone.
Shapes: on a GPU a ~1B Llama (22 layers of hidden 2048, 16 heads, 8 KV heads, FFN 5632) and a
7B-shaped model (hidden 4096, 32 heads, FFN 11008; 4 of its 32 layers, to fit one GPU) at 8192-token
packs in bf16, the engine with the Triton shared-prefix attention; on CPU (no GPU, or --cpu) the
same proportions scaled down (hidden 128 and 256, 4 and 2 layers, 1024-token packs, fp32; the
engine with its CPU attention, `blocks`: SDPA once per group, the shared prefix held once), where
absolute speeds mean nothing (2 shared cores) and the ratio is the figure. --tiny: one very small
shape and a few steps (the test's smoke run). The vocabulary is the default byte tokenizer's.

Measured: the engine's figures are medians over the logged intervals after the first (log.interval=1:
one interval per step; compilation and warm-up excluded) of summary.json's history; the baseline's
are medians over --baseline-steps timed steps after --warmup steps. triplets/s counts triplets
trained on (one group = one triplet); tokens/s "processed" counts every token position the model
ran (the engine's packed sequences with their end padding, the baseline's padded batches), "real"
the non-padding ones (for the baseline, the prefix once per candidate). FLOP basis, the same formula
for both (engine.progress): 6 x (non-embedding matmul parameters) x tokens + attention
(12 x layers x hidden per (query, key) pair) over the pairs each layout computes: for the engine
its real tokens and exactly the pairs the shared-prefix mask allows (as engine/trainer.py logs
it); for the baseline every processed (padded) token and the causal pairs of each padded row,
L(L+1)/2 for a batch padded to length L. MFU = that over a peak, two columns: the card's measured
bf16 peak (engine.progress.peak_tflops, an 8192^3 GEMM, or $POLAR_PEAK_TFLOPS; what the training line
shows) and its datasheet dense bf16 peak (benchmarks/datasheet_peaks.py), the conventional figure that
issue 10's target (>= 45% bf16 MFU) is read against; none on CPU. A run that fails is reported with
its exit code, not dropped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout's engine/polar/benchmarks packages
    sys.path.insert(0, str(ROOT))

from benchmarks.datasheet_peaks import (MFU_TARGET, TARGET_BASIS, datasheet_mfu, measured_basis,  # noqa: E402
                                       peaks_line)
from benchmarks.pretrain_runs import run_logged, run_pretrain, train_rows  # noqa: E402


def llama_shape(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int) -> list[str]:
    return [f"model.num_layers={layers}", f"model.hidden_size={hidden}", f"model.num_attention_heads={heads}",
            f"model.num_query_groups={kv_heads}", f"model.ffn_hidden_size={ffn}"]


# name -> the engine settings of its shape (the baseline reads the same settings)
GPU_SHAPES = {"~1B (22 x 2048)": llama_shape(22, 2048, 16, 8, 5632),
              "7B-shaped (4 x 4096)": llama_shape(4, 4096, 32, 32, 11008)}
GPU_COMMON = ["data.seq_length=8192", "train.global_batch=8", "train.micro_batch=1", "train.precision=bf16",
              "train.attention_backend=triton", "train.kernels=triton", "synthetic.train_triplets=4000"]
CPU_SHAPES = {"1B-like (4 x 128)": llama_shape(4, 128, 4, 2, 352), "7B-like (2 x 256)": llama_shape(2, 256, 8, 8, 688)}
CPU_COMMON = ["data.seq_length=1024", "train.global_batch=4", "train.micro_batch=1", "train.precision=fp32",
              "train.attention_backend=blocks", "synthetic.train_triplets=1000"]
TINY_SHAPES = {"tiny (1 x 32)": llama_shape(1, 32, 2, 2, 64)}
TINY_COMMON = ["data.seq_length=512", "train.global_batch=2", "train.micro_batch=1", "train.precision=fp32",
               "synthetic.train_triplets=200"]
# both sides: ranking loss only (no auxiliary LM head), no time limit, no evaluation during training
RUN_COMMON = ["train.aux_lm_weight=0", "train.time_limit_s=0", "train.eval_interval=0", "train.warmup_steps=1",
              "log.interval=1", "log.tensorboard=false", "checkpoint.resume=false", "checkpoint.keep=1",
              "checkpoint.save_at_end=false", "synthetic.eval_triplets=16"]


# ---- the baseline: what an HF-style reward-model trainer runs ------------------------------------

def hf_config(model_cfg, pad_id: int, attn: str = "sdpa"):
    """A LlamaConfig of the engine's shape, a scalar score head, `pad_id` as its pad token: the
    config `polar convert engine-to-hf` exports for such a model (bos/eos are never read here)."""
    import transformers

    from polar.convert.llama import hf_config as exported_config

    exported = exported_config(model_cfg, pad_token_id=pad_id, bos_token_id=pad_id, eos_token_id=pad_id,
                               dtype="float32")
    return transformers.LlamaConfig.from_dict(exported, attn_implementation=attn)


def build_baseline(model_cfg, pad_id: int, attn: str = "sdpa", seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForSequenceClassification(hf_config(model_cfg, pad_id, attn))


def collate_candidates(groups, pad_id: int):
    """The baseline's batch of triplet groups: per group its candidates, positive first, each as
    `prefix + candidate` (the prefix repeated), right-padded with `pad_id` to the longest of the
    batch. -> (ids int64 [n, L], attention mask int64 [n, L], lengths int64 [n])."""
    import torch

    seqs = []
    for g in groups:
        for k in np.argsort(-g.labels, kind="stable"):
            seqs.append(np.concatenate([g.prefix, g.candidates[k]]))
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lengths.max())
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):  # one row copy per sequence
        ids[i, :len(s)] = s
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return torch.from_numpy(ids), torch.from_numpy(mask), lengths


def candidate_rewards(model, ids, mask):
    """One scalar per row: the score head at the row's last token that is not the pad id."""
    return model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()


def padding_check(model, groups, pad_id: int) -> float:
    """The largest |reward in the baseline's padded batch - reward of that sequence run alone,
    unpadded| over the groups' candidates: zero up to rounding when the padding, the attention mask
    and the reading position are right (`model`'s config must carry the pad id the batch uses)."""
    import torch

    ids, mask, lengths = collate_candidates(groups, pad_id)
    with torch.no_grad():
        batched = candidate_rewards(model, ids, mask)
        alone = torch.cat([candidate_rewards(model, ids[i:i + 1, :n], mask[i:i + 1, :n])
                           for i, n in enumerate(lengths.tolist())])
    return float((batched - alone).abs().max())


def batch_flops(lengths_padded: int, rows: int, dense_per_token: float, attn_per_pair: float) -> float:
    """Model FLOPs of one padded micro-batch: every position through the matmuls, the causal pairs
    of each padded row through attention (the docstring's basis)."""
    return rows * (lengths_padded * dense_per_token + lengths_padded * (lengths_padded + 1) / 2 * attn_per_pair)


def step_groups(loader, batch_number: int) -> list:
    """The groups of optimizer step `batch_number` of `loader` (the engine's GlobalBatchLoader), in order."""
    return [g for seq in loader.source.sequences(loader.global_batch_indices(batch_number)) for g in seq]


def run_baseline(overrides: list[str], attn: str, warmup: int, steps: int, micro_triplets: int, cpu: bool) -> dict:
    """Trains the baseline on the engine's first warmup + steps global batches; timed after warmup."""
    import torch
    import torch.nn.functional as F
    import transformers

    from engine.config_load import load_config
    from engine.data import GlobalBatchLoader
    from engine.progress import attention_flops_per_pair, dense_flops_per_token, peak_tflops
    from polar import pretrain_recipe
    from polar.presets import resolve_config

    cfg = load_config(pretrain_recipe.CONFIG_CLASS, resolve_config(pretrain_recipe.DEFAULT_PRESET), overrides)
    pretrain_recipe.check(cfg)  # the vocabulary size, as the engine run settles it
    data = pretrain_recipe.synthetic_data(cfg)
    m, tc = cfg.model, cfg.train
    loader = GlobalBatchLoader(data.train, tc.global_batch, tc.micro_batch, 0, 1, seed=tc.seed, pad_id=data.pad_id)
    cuda = torch.cuda.is_available() and not cpu
    device = torch.device("cuda" if cuda else "cpu")
    model = build_baseline(m, data.pad_id, attn, seed=tc.seed).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps,
                            weight_decay=tc.weight_decay, fused=cuda)
    dense = dense_flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                                  m.num_query_groups)
    attn_pair = attention_flops_per_pair(m.num_layers, m.hidden_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and tc.precision != "fp32")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rows = []
    for b in range(warmup + steps):
        groups = step_groups(loader, b)
        if any(len(g.candidates) != 2 for g in groups):
            raise ValueError("the baseline trains on triplets: every group needs exactly 2 candidates")
        sync()
        t0 = time.perf_counter()
        processed = real = 0
        flops = 0.0
        loss_sum = torch.zeros((), device=device)
        for j in range(0, len(groups), micro_triplets):
            ids, mask, lengths = collate_candidates(groups[j:j + micro_triplets], data.pad_id)
            processed += ids.numel()
            real += int(lengths.sum())
            flops += batch_flops(ids.shape[1], ids.shape[0], dense, attn_pair)
            with autocast:
                r = candidate_rewards(model, ids.to(device, non_blocking=True), mask.to(device, non_blocking=True))
            r = r.view(-1, 2)  # (chosen, rejected) per triplet
            loss = F.softplus(r[:, 1] - r[:, 0]).sum() / len(groups)  # mean over the step's pairs
            loss.backward()
            loss_sum += loss.detach()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        rows.append({"step": b + 1, "seconds": dt, "triplets": len(groups), "processed": processed, "real": real,
                     "flops": flops, "loss": float(loss_sum)})
    timed = rows[warmup:] or rows
    peak = peak_tflops(device)
    med = lambda key: statistics.median(r[key] / r["seconds"] for r in timed)  # noqa: E731
    out = {"triplets_per_step": statistics.fmean(r["triplets"] for r in timed),
           "triplets_per_s": med("triplets"), "tokens_per_s_processed": med("processed"),
           "tokens_per_s_real": med("real"), "tflops_per_s": med("flops") / 1e12,
           "step_time_s": statistics.median(r["seconds"] for r in timed), "loss": timed[-1]["loss"],
           "parameters": sum(p.numel() for p in model.parameters()), "transformers": transformers.__version__,
           "history": rows}
    if peak:
        out["mfu"] = out["tflops_per_s"] / peak
    return out


# ---- the engine --------------------------------------------------------------------------------

def run_engine(overrides: list[str], run_dir: Path, cuda: bool, timeout: int) -> dict:
    rc, tail, wall, s = run_pretrain(overrides, run_dir, cuda, timeout)
    # checkpoint.save_at_end=false writes no weights at the end (on a GPU, gigabytes nobody reads and
    # 15-30 s of the stage); the directory may still hold the start-up write test's leftovers
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    row = {"exit": rc, "wall_s": wall}
    if s is None:
        row["error"] = tail
        return row
    train = train_rows(s)
    timed = train[1:] or train
    med = lambda f: statistics.median(f(r) for r in timed)  # noqa: E731
    row.update(triplets_per_step=med(lambda r: r["triplets_per_s"] * r["step_time_s"]),
               triplets_per_s=med(lambda r: r["triplets_per_s"]),
               tokens_per_s_processed=med(lambda r: r["tokens_per_s"] / r["packing"]),
               tokens_per_s_real=med(lambda r: r["tokens_per_s"]), tflops_per_s=med(lambda r: r["tflops_per_s"]),
               step_time_s=med(lambda r: r["step_time_s"]), loss=train[-1]["loss"], parameters=s["parameters"],
               peak_memory_gb=s.get("peak_memory_gb"))
    if all("mfu" in r for r in timed):
        row["mfu"] = med(lambda r: r["mfu"])
    return row


def run_baseline_subprocess(overrides: list[str], attn: str, args, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-worker", str(out), "--attn", attn,
           "--warmup", str(args.warmup), "--baseline-steps", str(args.baseline_steps),
           "--micro-triplets", str(args.micro_triplets)] + (["--cpu"] if args.cpu else []) + ["--", *overrides]
    rc, tail, wall = run_logged(cmd, args.timeout)
    row = {"exit": rc, "wall_s": wall}
    if rc != 0 or not out.exists():
        row["error"] = tail
        return row
    row.update(json.loads(out.read_text()))
    return row


def flash_attn_imports() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


# ---- the table ---------------------------------------------------------------------------------

def _num(r: dict, key: str, fmt: str) -> str:
    v = r.get(key)
    return "-" if v is None or v != v else format(v, fmt)


def ratio_rows(rows: list[dict]) -> list[dict]:
    """engine / baseline per shape and baseline variant (both rows must have run)."""
    out = []
    for e in (r for r in rows if r["trainer"] == "engine" and "triplets_per_s" in r):
        for b in (r for r in rows if r["shape"] == e["shape"] and r["trainer"] != "engine" and "triplets_per_s" in r):
            out.append({"shape": e["shape"], "baseline": b["trainer"],
                        "triplets_per_s": e["triplets_per_s"] / b["triplets_per_s"],
                        "tokens_per_s_processed": e["tokens_per_s_processed"] / b["tokens_per_s_processed"],
                        "tokens_per_s_real": e["tokens_per_s_real"] / b["tokens_per_s_real"]})
    return out


def with_datasheet_mfu(row: dict, device: str) -> dict:
    """`row` with its MFU against the device's datasheet dense bf16 peak (one GPU a run)."""
    return {**row, "mfu_datasheet": datasheet_mfu(row.get("tflops_per_s"), device)}


def print_table(header: str, rows: list[dict], ratios: list[dict]) -> None:
    print(header + "\n")
    print("| shape | trainer | exit | triplets/step | triplets/s | tokens/s processed | tokens/s real | "
          "TFLOP/s | MFU vs measured peak | MFU vs datasheet peak | loss (last step) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['trainer']} | {r['exit']} | {_num(r, 'triplets_per_step', '.1f')} | "
              f"{_num(r, 'triplets_per_s', ',.1f')} | {_num(r, 'tokens_per_s_processed', ',.0f')} | "
              f"{_num(r, 'tokens_per_s_real', ',.0f')} | {_num(r, 'tflops_per_s', '.3g')} | {_num(r, 'mfu', '.1%')} | "
              f"{_num(r, 'mfu_datasheet', '.1%')} | {_num(r, 'loss', '.4f')} |")
    print(f"\nThe MFU target (>= {MFU_TARGET:.0%} bf16) is read against the {TARGET_BASIS} peak.")
    print("\nengine / baseline (triplets/s is the headline figure):\n")
    print("| shape | against | triplets/s | tokens/s processed | tokens/s real |")
    print("|---|---|---|---|---|")
    for q in ratios:
        print(f"| {q['shape']} | {q['baseline']} | {q['triplets_per_s']:.2f}x | {q['tokens_per_s_processed']:.2f}x | "
              f"{q['tokens_per_s_real']:.2f}x |")
    if not ratios:
        print("| - | - | - | - | - |")


def transformers_version() -> str:
    """Without importing it (seconds): the baseline runs in its own process."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "not installed"


def write_json(path: str, device: str, steps: int, settings: list[str], rows: list[dict],
               measured_peak: float | None = None) -> None:
    import torch

    Path(path).write_text(json.dumps({"device": device, "torch": torch.__version__,
                                      "transformers": transformers_version(), "steps": steps,
                                      "settings": settings, "measured_peak_tflops": measured_peak,
                                      "measured_peak_basis": measured_basis() if measured_peak else None,
                                      "rows": rows, "ratios": ratio_rows(rows)}, indent=1))


def check_args(ap: argparse.ArgumentParser, args) -> None:
    """Refuses counts that would time nothing, or time the warm-up: `--steps 0` and `--micro-triplets 0`
    read as the defaults, `--baseline-steps 0` timed the warm-up step, and a negative count was a
    traceback or a ratio of the wrong steps."""
    if args.steps is not None and args.steps < 2:
        ap.error(f"--steps must be at least 2 (the first interval is warm-up, left out of the medians), "
                 f"not {args.steps}")
    if args.baseline_steps is not None and args.baseline_steps < 1:
        ap.error(f"--baseline-steps must be at least 1, not {args.baseline_steps}")
    if args.warmup is not None and args.warmup < 0:
        ap.error(f"--warmup must be at least 0, not {args.warmup}")
    if args.micro_triplets is not None and args.micro_triplets < 1:
        ap.error(f"--micro-triplets must be at least 1, not {args.micro_triplets}")
    if args.timeout < 1:
        ap.error(f"--timeout must be at least 1 second, not {args.timeout}")
    try:
        args.shapes = [int(p) for p in args.shapes.split(",")] if args.shapes else []
    except ValueError:
        ap.error(f"--shapes takes positions from 1, comma-separated (1,2), not {args.shapes!r}")
    if any(p < 1 for p in args.shapes) or len(set(args.shapes)) != len(args.shapes):
        ap.error(f"--shapes takes distinct positions from 1, not {','.join(map(str, args.shapes))}")


def pick_shapes(ap: argparse.ArgumentParser, shapes: dict, positions: list[int]) -> dict:
    """The shapes at `positions` (from 1), in the order the table lists them; all where none is given."""
    if not positions:
        return shapes
    names = list(shapes)
    if max(positions) > len(names):
        ap.error(f"--shapes {max(positions)}: there are {len(names)} shape(s) here: "
                 + ", ".join(f"{i} {n}" for i, n in enumerate(names, 1)))
    return {names[p - 1]: shapes[names[p - 1]] for p in sorted(positions)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # on CPU a few timed steps spread the ratio by ~0.1 between runs (benchmarks/RESULTS.md, 2026-12-04)
    ap.add_argument("--steps", type=int, default=None,
                    help="engine steps (default: 10 on a GPU, 24 on CPU, 8 --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="baseline steps before timing (default 2 GPU, 1 CPU)")
    ap.add_argument("--baseline-steps", type=int, default=None,
                    help="baseline steps timed (default 4 GPU or --tiny, 12 CPU)")
    ap.add_argument("--micro-triplets", type=int, default=None,
                    help="baseline triplets per forward (2 sequences each; default 16 GPU, 4 CPU)")
    ap.add_argument("--json", help="write the rows and ratios here")
    ap.add_argument("--cpu", action="store_true", help="the CPU shapes even where a GPU is")
    ap.add_argument("--tiny", action="store_true", help="one very small shape (a smoke run)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run (engine or baseline)")
    ap.add_argument("--shapes", default="",
                    help="which of the shapes to run, by position from 1, comma-separated (default: all; on a GPU "
                         "1 is the ~1B model, 2 the 7B-shaped one)")
    ap.add_argument("--baseline-worker", metavar="OUT", help=argparse.SUPPRESS)
    ap.add_argument("--attn", default="sdpa", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra settings for every run, engine and baseline (after --)")
    args = ap.parse_args()
    check_args(ap, args)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    args.cpu = not cuda
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    args.baseline_steps = args.baseline_steps or (4 if cuda or args.tiny else 12)
    args.micro_triplets = args.micro_triplets or (16 if cuda else (2 if args.tiny else 4))
    if args.baseline_worker:
        result = run_baseline(args.overrides, args.attn, args.warmup, args.baseline_steps, args.micro_triplets,
                              args.cpu)
        Path(args.baseline_worker).write_text(json.dumps(result, indent=1))
        return 0

    steps = args.steps or (10 if cuda else 8 if args.tiny else 24)
    shapes, common = ((TINY_SHAPES, TINY_COMMON) if args.tiny else (GPU_SHAPES, GPU_COMMON) if cuda
                      else (CPU_SHAPES, CPU_COMMON))
    shapes = pick_shapes(ap, shapes, args.shapes)
    settings = common + RUN_COMMON + [f"train.steps={steps}", *args.overrides]
    attns = ["sdpa"] + (["flash_attention_2"] if cuda and flash_attn_imports() else [])
    device = torch.cuda.get_device_name() if cuda else "CPU"
    rows = []
    with tempfile.TemporaryDirectory(prefix="polar_e2e_") as tmp:
        for i, (shape, shape_settings) in enumerate(shapes.items()):
            overrides = shape_settings + settings
            row = {"shape": shape, "trainer": "engine", "overrides": overrides,
                   **run_engine(overrides, Path(tmp) / f"engine{i}", cuda, args.timeout)}
            rows.append(with_datasheet_mfu(row, device))
            for attn in attns:
                out = Path(tmp) / f"baseline{i}_{attn}.json"
                rows.append(with_datasheet_mfu({"shape": shape, "trainer": f"HF {attn}",
                                                **run_baseline_subprocess(overrides, attn, args, out)}, device))
            # as each shape ends (a run cut short by an outer time limit still leaves these)
            for r in rows[-1 - len(attns):]:
                print(f"{shape} / {r['trainer']}: exit {r['exit']} in {r['wall_s']:.0f}s, "
                      f"{_num(r, 'triplets_per_s', ',.1f')} triplets/s"
                      + (f" ({r['error'][-300:]})" if "error" in r else ""), file=sys.stderr, flush=True)
            for q in ratio_rows(rows[-1 - len(attns):]):
                print(f"{shape}: engine / {q['baseline']} {q['triplets_per_s']:.2f}x triplets/s", file=sys.stderr,
                      flush=True)
            if args.json:
                write_json(args.json, device, steps, settings, rows)
    # both runs took MFU against this peak (cached by the first to measure it); read after the runs,
    # so this process holds no GPU memory while they train
    from engine.progress import peak_tflops

    measured_peak = peak_tflops(torch.device("cuda")) if cuda else None
    if args.json:
        write_json(args.json, device, steps, settings, rows, measured_peak)
    ratios = ratio_rows(rows)
    header = (f"{device}, torch {torch.__version__}, transformers {transformers_version()}; engine {steps} steps "
              f"(median of the intervals after the first), baseline {args.warmup} warm-up + {args.baseline_steps} "
              f"timed steps, {args.micro_triplets} triplets per micro-batch; settings: {' '.join(settings)}\n"
              + peaks_line(device, measured_peak))
    if not cuda:
        header += ("\nCPU: absolute speeds mean nothing here (small shapes, shared cores); the engine/baseline "
                   "ratio is the figure.")
    print_table(header, rows, ratios)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
