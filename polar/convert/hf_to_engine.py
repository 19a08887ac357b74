"""`polar convert hf-to-engine SRC DST [--tp N --pp N]`: a transformers checkpoint to an engine checkpoint.

DST afterwards holds
    latest -> step_00000000/   the weights (megatron dist_checkpointing: loads at any TP/PP layout)
    model.yaml                 the model section of a run config the weights need (--config it)
    tokenizer/                 tokenizer.json (+ the reward tokens) and polar_tokenizer.json

Architectures: Llama, Mistral, Qwen2 (causal LM or one-label sequence classification), InternLM2
and InternLM2ForRewardModel (POLAR's released class). A value head comes from the checkpoint
(`score` / `v_head`) or starts at zero (POLAR: a new value head is zero-initialised); a causal LM's
head is kept for the auxiliary next-token loss (a run without it ignores it). Tokens the
tokenizer gains (the reward tokens) get embedding rows set to the mean of its own tokens' rows
(also where the table already had rows for their ids: padding no token was trained on), the usual
choice for new tokens: it keeps them inside the distribution the network has seen.
The conversion runs in one process at TP1/PP1 by default (dist_checkpointing reshards on load);
`--tp/--pp` under torchrun split a model too large for one process.
"""
from __future__ import annotations

import os
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from engine.cli_types import ArgumentParser
from polar.convert import internlm2, llama
from polar.convert.common import Partial, write_failed
from polar.convert.engine_io import MODEL_YAML, build, write_model_yaml
from polar.convert.hf_checkpoint import ConvertError, HFCheckpoint
from polar.convert.tokenizer_files import (gguf_tokenizer_dir, library_vocab_size, read_library, special_strings,
                                           write_tokenizer)
from polar.tokenizer import REWARD_SEP_TEXT, REWARD_TOKEN_TEXT

# the embedding is padded to a multiple of lcm(128, tp): the same shape for TP 1, 2, 4, 8
VOCAB_MULTIPLE = 128


def _architecture(cfg: dict, src) -> tuple[str, object]:
    archs = cfg.get("architectures") or []
    if not archs:
        raise ConvertError(f"{src}/config.json: no 'architectures' entry naming the model class")
    # a bare string would be indexed to its first letter and reported as architecture 'L'
    if not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ConvertError(f"{src}/config.json: 'architectures' must be a list of class names such as "
                           f"[\"LlamaForCausalLM\"], got {archs!r:.80}")
    arch = archs[0]
    for module in (llama, internlm2):
        if arch in module.ARCHITECTURES:
            # transformers' Auto classes build the class model_type names, not architectures[0]: another
            # model_type (granite, qwen3, ...) computes something else from the same weights and keys
            family, model_type = module.ARCHITECTURES[arch], cfg.get("model_type")
            if model_type is not None and model_type != family:
                raise ConvertError(f"{src}/config.json: model_type {model_type!r:.60} does not match architecture "
                                   f"{arch!r} (model_type {family!r}); transformers would build a {model_type} "
                                   "model, which is not supported")
            return arch, module
    known = sorted(llama.ARCHITECTURES) + sorted(internlm2.ARCHITECTURES)
    raise ConvertError(f"{src}/config.json: architecture {arch!r} is not supported; supported: {', '.join(known)}")


def _on_rank0(rank: int, fn, partial: Partial) -> None:
    """Rank 0 runs `fn`, a step of writing `partial.dst`; its failure reaches every rank
    (engine.checkpoint's on_rank0), and rank 0 removes what was written."""
    from engine.checkpoint import on_rank0

    def step():
        try:
            fn()
        except BaseException:  # KeyboardInterrupt too: nothing half-written stays behind
            partial.drop()
            raise

    error = on_rank0(rank, step)
    if error:
        raise write_failed(partial.dst, error)


def convert(src, dst, *, tp: int = 1, pp: int = 1, gguf_file: str | None = None, tokenizer: str | None = None,
            bos: str | None = None, pad: str | None = None, log=print) -> Path:
    from engine import checkpoint
    from engine.config import ModelConfig
    from engine.weights import canonical_shapes, load_canonical

    for flag, size in (("--tp", tp), ("--pp", pp)):
        if size < 1:
            raise ConvertError(f"{flag} {size}: must be at least 1")
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConvertError(f"{dst}: exists and is not empty; choose a new directory")
    ckpt = HFCheckpoint(src, gguf_file)
    src = ckpt.src
    cfg = ckpt.config
    arch, module = _architecture(cfg, src)
    fields = module.model_config(cfg, src)
    hf_model = ModelConfig(**fields)
    shapes = canonical_shapes(hf_model)
    if module is internlm2:
        tensors = internlm2.to_canonical(ckpt, shapes, hf_model.num_attention_heads, hf_model.num_query_groups)
    else:
        tensors = llama.to_canonical(ckpt, shapes)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if tokenizer:
            tok_dir = Path(tokenizer)
        elif ckpt.gguf_file:
            tok_dir = gguf_tokenizer_dir(src, ckpt.gguf_file, work / "gguf_tokenizer")
        else:
            tok_dir = src
        if not (tok_dir / "tokenizer.json").is_file():
            raise ConvertError(f"{tok_dir}: no tokenizer.json; pass --tokenizer DIR holding the model's tokenizer.json")
        bos, pad = special_strings(tok_dir, cfg, bos, pad)
        source = read_library(tok_dir / "tokenizer.json")
        # every id of the source tokenizer needs a trained embedding row: a larger tokenizer is not
        # this model's (padding it would score its extra ids with made-up rows)
        source_vocab = library_vocab_size(source)
        if source_vocab > hf_model.vocab_size:
            raise ConvertError(f"{tok_dir / 'tokenizer.json'}: the tokenizer has {source_vocab} tokens but "
                               f"{src}/config.json gives vocab_size={hf_model.vocab_size}; pass the tokenizer the "
                               "model was trained with (--tokenizer DIR)")
        reward = {}
        if "reward_token_id" in cfg:  # InternLM2ForRewardModel: the token its reward is read at
            tid = cfg["reward_token_id"]
            text = source.id_to_token(tid) if isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0 else None
            if text is None:
                raise ConvertError(f"{src}/config.json: reward_token_id={cfg['reward_token_id']} is not in "
                                   f"{tok_dir}/tokenizer.json; pass the tokenizer the model was trained with")
            reward["reward_token"] = text
        sep_text, reward_text = REWARD_SEP_TEXT, reward.get("reward_token", REWARD_TOKEN_TEXT)
        if {bos, pad} & {sep_text, reward_text}:
            raise ConvertError(f"{tok_dir}: BOS {bos!r} / pad {pad!r} would share an id with a reward token "
                               f"({sep_text!r}, {reward_text!r}); pass other tokens with --bos / --pad")
        try:
            tok = write_tokenizer(tok_dir, work / "tokenizer", bos, pad, **reward)
        except ConvertError:
            raise
        except ValueError as e:  # HFTokenizer's checks of the written file (which lives in a temporary directory)
            raise ConvertError(f"{tok_dir / 'tokenizer.json'}: the tokenizer with the reward tokens added is not "
                               f"usable: {e}") from e
        # past the model's rows now only the ids write_tokenizer appended (the missing reward tokens);
        # an appended id can also fall on a row the table already has (Qwen2 pads its vocabulary past
        # the tokenizer), which no token was trained on: it starts at the mean row all the same
        vocab = max(hf_model.vocab_size, tok.vocab_size)
        if tok.vocab_size > source_vocab:
            for name in ("embedding", "lm_head"):
                if name in tensors:
                    rows = tensors[name]
                    mean = rows[:source_vocab].float().mean(0, keepdim=True).to(rows.dtype)
                    rows = torch.cat([rows, mean.expand(vocab - rows.shape[0], -1)])
                    rows[source_vocab:tok.vocab_size] = mean
                    tensors[name] = rows
            head = ", and LM head row(s) to the mean row" if "lm_head" in tensors else ""
            if vocab > hf_model.vocab_size:
                log(f"tokenizer grew to {vocab} tokens (the reward tokens were added): "
                    f"{vocab - hf_model.vocab_size} new embedding row(s) set to the mean embedding{head}")
            if hf_model.vocab_size > source_vocab:
                log(f"{min(tok.vocab_size, hf_model.vocab_size) - source_vocab} unused row(s) of the model's "
                    f"embedding (ids {source_vocab}+) went to the added reward token(s), set to the mean "
                    f"embedding{head}")
        if tensors["value_head"] is None:
            tensors["value_head"] = torch.zeros(1, hf_model.hidden_size, dtype=tensors["embedding"].dtype)
            log("no value head in the checkpoint: a zero-initialised one was added")
        model = dataclasses.replace(hf_model, vocab_size=vocab, make_vocab_size_divisible_by=VOCAB_MULTIPLE)

        lm_head = "lm_head" in tensors
        if lm_head:
            log("the causal LM's head was kept (it starts train.aux_lm_weight > 0 from the trained head)")
        chunks, rt = build(model, tp, pp, lm_head=lm_head)
        load_canonical(chunks, tensors, model)
        del tensors
        partial = Partial(dst)
        _on_rank0(rt.rank, partial.claim, partial)
        try:
            checkpoint.save(str(partial.path), 0, chunks, None,
                            {"step": 0, "converted_from": str(src), "architecture": arch})
        except BaseException as e:  # KeyboardInterrupt too
            if rt.rank == 0:
                partial.drop()
            if isinstance(e, checkpoint.CheckpointWriteError):
                raise write_failed(dst, e) from e
            raise

        def finish():
            write_model_yaml(partial.path / MODEL_YAML, model)
            shutil.copytree(work / "tokenizer", partial.path / "tokenizer")
            partial.publish()

        _on_rank0(rt.rank, finish, partial)
    log(f"wrote {dst} ({arch}, {model.num_layers} layers, hidden {model.hidden_size}, vocab {model.vocab_size}; "
        f"reward tokens {tok.reward_sep_text!r}={tok.reward_sep_id}, {tok.reward_token_text!r}={tok.reward_token_id})")
    return dst


def main(argv=None) -> int:
    ap = ArgumentParser(prog="polar convert hf-to-engine",
                                 description="a transformers checkpoint (safetensors or GGUF) -> an engine checkpoint")
    ap.add_argument("src", help="checkpoint directory (config.json + safetensors), or a .gguf file")
    ap.add_argument("dst", help="new engine checkpoint directory")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert at (under torchrun)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert at (under torchrun)")
    ap.add_argument("--gguf-file", default=None, help="the GGUF file inside SRC")
    ap.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: SRC)")
    ap.add_argument("--bos", default=None, help="BOS token string (default: from the tokenizer config)")
    ap.add_argument("--pad", default=None, help="pad token string (default: pad, else EOS, of the tokenizer config)")
    args = ap.parse_args(argv)
    from engine.quiet import silence_known_warnings

    silence_known_warnings()
    try:
        # under torchrun every rank converts its shard; one of them says what was written
        quiet = int(os.environ.get("RANK", "0")) != 0
        convert(args.src, args.dst, tp=args.tp, pp=args.pp, gguf_file=args.gguf_file, tokenizer=args.tokenizer,
                bos=args.bos, pad=args.pad, log=(lambda *a, **k: None) if quiet else print)
    except ConvertError as e:
        print(f"polar convert hf-to-engine: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
