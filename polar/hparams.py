"""`polar hparams`: learning rate and batch size from the paper's scaling laws (App. D.1.2).

    LR        = 0.0002306 * N^0.01125 * Dp^-0.66587 * Drm^0.33916
    BatchSize = 31.9032   * N^0.06944 * Drm^0.52997          (sequences)

N: reward-model parameters in millions; Dp: tokens the base model was pre-trained on, Drm: tokens
of reward-model pre-training, both in billions (the only units that reproduce the paper's chosen
values). The batch is in RM input sequences (one per candidate with its prompt and reference: a
triplet gives two, chosen and rejected); the engine's `train.global_batch` counts packed sequences,
each holding as many whole groups as fit, so the batch is divided by the average number of candidates
per packed sequence. That average is a property of the data, not of the pack length: at 16k tokens
it is 2 only where every group is longer than 8k tokens; with responses of 1-4096 tokens it is about
4.5 and with 1-2048 about 7.9, so a global_batch chosen for 2 would carry two to four times the
paper's batch. `--dataset DIR` measures it on a built dataset (its candidates over its packed
sequences, from the shards' index headers: no token is read); `--seq-per-packed` gives it by hand.

Which Dp and Drm give the paper's values (1.8B: lr 1.4e-5, batch 1940; 7B: 1.67e-5, 4343)? The
paper does not list them per model. Solving the laws for them with N = 1800 / 7000 gives
Drm ~ 870B / ~3.33T RM tokens (the paper reports about 0.94T and 3.6T seen) and Dp ~ 2.40T /
~3.73T base-model tokens for InternLM2.5-1.8B / -7B (assumed here: InternLM2.5's pre-training
token counts are not published in the paper). `PAPER_SETTINGS` holds these.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional

from engine.cli_types import ArgumentParser

# Without --dataset or --seq-per-packed: 2 candidates (one triplet) per packed sequence, true only of
# groups longer than half the pack (the output says it is assumed)
DEFAULT_SEQ_PER_PACKED = 2.0

# model -> (N millions, Dp billions, Drm billions): solved from the paper's chosen values (docstring)
PAPER_SETTINGS = {
    "POLAR-1.8B": (1800.0, 2400.0, 870.0),
    "POLAR-7B": (7000.0, 3730.0, 3330.0),
}


def learning_rate(n_millions: float, base_tokens_b: float, rm_tokens_b: float) -> float:
    return 0.0002306 * n_millions ** 0.01125 * base_tokens_b ** -0.66587 * rm_tokens_b ** 0.33916


def batch_size(n_millions: float, rm_tokens_b: float) -> float:
    """Sequences (RM inputs) per optimizer step."""
    return 31.9032 * n_millions ** 0.06944 * rm_tokens_b ** 0.52997


def reward_model_params(model) -> int:
    """Parameters of a reward model with this engine ModelConfig: embedding, decoder layers
    (attention with grouped-query K/V, SwiGLU, two RMSNorms, no biases), final norm, value head."""
    h, heads, groups = model.hidden_size, model.num_attention_heads, model.num_query_groups
    kv = groups * (h // heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * model.ffn_hidden_size + 2 * h
    return model.vocab_size * h + model.num_layers * layer + h + h


def preset_params(name: str) -> tuple[int, str]:
    """(parameters, config file) of a preset shipped in polar/configs (by name) or a YAML path."""
    from engine.config import ConfigError
    from engine.config_load import load_config
    from polar.presets import resolve_config
    from polar.pretrain_recipe import PretrainConfig

    try:
        path = resolve_config(name, option="--preset")
    except ConfigError as e:
        raise ValueError(str(e)) from None
    cfg = load_config(PretrainConfig, path)
    if cfg.model.vocab_size <= 0:
        raise ValueError(f"--preset {name}: {path} sets no model.vocab_size (taken from the "
                         "tokenizer at run time); give --params-millions instead")
    return reward_model_params(cfg.model), str(path)


def candidates_per_packed(path: str) -> tuple[int, int, int]:
    """(candidates, packed sequences, seq_length) of the built dataset at `path`: what one packed
    sequence carries of the paper's batch on average, counted as `polar data stats` counts it
    (polar.data_stats.candidate_count: from the index headers, no token read)."""
    from engine.indexed_dataset import IndexedDataset
    from polar.data_stats import candidate_count

    ds = IndexedDataset(path)
    return candidate_count(ds), len(ds), ds.seq_length


def _positive(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s}")
    return v


def main(argv: Optional[list] = None) -> int:
    paper = "\n".join(f"  {k}: --params-millions {n:g} --base-tokens-billions {dp:g} --rm-tokens-billions {drm:g}"
                      for k, (n, dp, drm) in PAPER_SETTINGS.items())
    ap = ArgumentParser(
        prog="polar hparams", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Learning rate and batch size from the POLAR paper's scaling laws (App. D.1.2):\n"
                    "  LR = 0.0002306 N^0.01125 Dp^-0.66587 Drm^0.33916, BatchSize = 31.9032 N^0.06944 Drm^0.52997\n"
                    "printed on stdout with the overrides that set them (train.lr, train.global_batch).",
        epilog=f"paper settings that reproduce its values:\n{paper}\n\nexample:\n"
               "  polar hparams --preset polar_7b --base-tokens-billions 3730 --rm-tokens-billions 3330 --dataset ds/\n"
               "\nexit status 2: a preset, YAML file or dataset that cannot be read")
    size = ap.add_mutually_exclusive_group(required=True)
    size.add_argument("--params-millions", type=_positive, help="reward-model parameters N, millions")
    size.add_argument("--preset", help="count N from a preset's model (polar/configs/NAME.yaml, or a YAML path)")
    ap.add_argument("--base-tokens-billions", type=_positive, required=True,
                    help="Dp: tokens the base model was pre-trained on, billions")
    ap.add_argument("--rm-tokens-billions", type=_positive, required=True,
                    help="Drm: tokens of reward-model pre-training, billions")
    per = ap.add_mutually_exclusive_group()
    per.add_argument("--dataset", metavar="DIR",
                     help="a built dataset (polar data build) to train on: the average candidates (RM "
                          "sequences) per packed sequence are measured on it, to express the batch in "
                          "train.global_batch's unit, packed sequences")
    per.add_argument("--seq-per-packed", type=_positive, default=None,
                     help="average RM sequences (one per candidate, two per triplet) per packed "
                          "sequence, given by hand (default: --dataset's measure, else an assumed "
                          f"{DEFAULT_SEQ_PER_PACKED:g}, true only of groups longer than half the pack)")
    a = ap.parse_args(argv)
    if a.dataset is not None:
        from engine.shard_format import DatasetFormatError

        try:
            cands, seqs, seq_length = candidates_per_packed(a.dataset)
        except (DatasetFormatError, OSError) as e:
            said = str(e) if str(e).startswith(a.dataset) else f"{a.dataset}: {e}"  # most name the path
            print(f"polar hparams: --dataset {said}", file=sys.stderr)
            return 2
        if not seqs:  # shards written only to make a build's directory complete
            print(f"polar hparams: --dataset {a.dataset}: its shards hold no packed sequence, so no candidates a "
                  "pack to measure", file=sys.stderr)
            return 2
        per_packed = cands / seqs
        measured = (f"measured on {a.dataset}: {cands:,} candidates in {seqs:,} packed sequences of "
                    f"{seq_length} tokens")
    elif a.seq_per_packed is not None:
        per_packed, measured = a.seq_per_packed, "given"
    else:
        per_packed = DEFAULT_SEQ_PER_PACKED
        measured = ("ASSUMED, true only where every group is longer than half the pack; give --dataset DIR "
                    "to measure it on your data")
    if a.preset is not None:
        try:
            params, where = preset_params(a.preset)
        except Exception as e:  # a bad YAML is a ConfigError, a missing file a ValueError
            print(f"polar hparams: {e}", file=sys.stderr)
            return 2
        n = params / 1e6
        source = f"{params:,} parameters counted from {where}"
    else:
        n = a.params_millions
        source = "given"
    lr = learning_rate(n, a.base_tokens_billions, a.rm_tokens_billions)
    bs = batch_size(n, a.rm_tokens_billions)
    packed = max(1, round(bs / per_packed))
    print(f"N   = {n:,.1f}M parameters ({source})")
    print(f"Dp  = {a.base_tokens_billions:g}B base-model tokens, Drm = {a.rm_tokens_billions:g}B RM tokens")
    print(f"learning rate = {lr:.4g}")
    print(f"batch size    = {bs:,.0f} sequences = {packed:,} packed sequences at "
          f"{per_packed:.3g} sequences per packed sequence ({measured})")
    print(f"overrides: train.lr={lr:.4g} train.global_batch={packed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
