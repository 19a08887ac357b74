"""`polar convert engine-to-hf SRC DST [--format hf|internlm2-reward]`: an engine checkpoint (saved at
any layout) to a transformers directory.

--format hf (default): LlamaForSequenceClassification (q/k/v biases as attention_bias with zero
o_proj biases, not Qwen2's class, whose tokenizer transformers rebuilds as Qwen2's: llama.hf_config):
one label, `score` = the value head, pad_token_id = the tokenizer's pad, so transformers, vLLM and
SGLang read the score at the last non-pad token (the reward token, which ends every POLAR input).
No remote code is needed.
--format internlm2-reward: the InternLM2ForRewardModel weight layout (fused wqkv per key-value
group, v_head) and config (reward_token_id) that POLAR's official tooling loads; the modeling code
itself is InternLM's remote code, which is not shipped here.

SRC and the model settings are found as `polar score/eval/serve --checkpoint` and checkpoint.init_from
find them (engine.checkpoint): a run directory, its checkpoints/ or one step directory; --config, else
the step's model.json, the converter's model.yaml beside it or the run's config.yaml.

The tokenizer: --tokenizer DIR (or `byte`), else `tokenizer/` beside the checkpoint, else the one
the run trained with (polar.checkpoint_tokenizer.find); a byte-tokenized run (the embedded default)
gets the byte tokenizer written as a tokenizer.json (polar/convert/byte_tokenizer.py).

The checkpoint is loaded at TP1/PP1 in one process (dist_checkpointing reshards it), so the whole
model must fit in this machine's memory.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from engine.cli_types import ArgumentParser
from polar.convert import internlm2, llama
from polar.convert.common import Partial, write_failed
from polar.convert.engine_io import build, read_model_config
from polar.convert.hf_checkpoint import ConvertError
from polar.convert.tokenizer_files import copy_tokenizer, load as load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_BYTES = 4 << 30


def _step_dir(src: Path) -> Path:
    """The step SRC names, found as score, eval, serve and checkpoint.init_from find it (engine.checkpoint
    resolve): a run directory, its checkpoints/ (the step `latest` names, else the newest complete
    one) or one step directory."""
    from engine import checkpoint

    if not src.exists():
        raise ConvertError(f"{src}: no such engine checkpoint directory")
    try:
        return Path(checkpoint.resolve(str(src)))
    except checkpoint.CheckpointNotFound as e:
        raise ConvertError(f"{src}: {e}") from None
    except OSError as e:  # a `latest` marker or a directory this user may not read
        raise ConvertError(f"{src}: cannot be read ({e})") from None


def _model_config(step: Path, config: str | None):
    """(the file, the model settings) of the step: --config, else the settings recorded with it, as
    score, eval and serve read them (engine.checkpoint_model.saved_model_settings: the step's model.json,
    the converter's model.yaml beside it, the run's config.yaml)."""
    from engine import checkpoint_model
    from engine.config import ConfigError

    if config:
        return Path(config), read_model_config(Path(config))
    try:
        found = checkpoint_model.saved_model_settings(str(step))
        if found is None:
            raise ConvertError(f"{step}: no model settings recorded with it (model.json in the step, model.yaml "
                               "beside it or the run's config.yaml); pass --config FILE (a model.yaml or the run "
                               "config.yaml it was written with)")
        return Path(found[1]), checkpoint_model.model_config_from(*found)
    except ConfigError as e:  # a recorded file that does not read back, or settings the engine refuses
        raise ConvertError(str(e)) from None


def _save_file(tensors: dict, path: Path) -> None:
    """safetensors' save_file writes a temporary file and renames it over `path`, and the temporary file
    is created 0600 (as mkstemp creates them): a server running as another user (a vLLM or SGLang
    container) or a teammate on shared storage could not read the weights. They get the mode every other
    file written here gets, a new file's (0666 less the umask, or what a default ACL gives): read off an
    empty file created at `path` first, which save_file then replaces."""
    from safetensors.torch import save_file

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, mode)


def _save_safetensors(tensors: dict, dst: Path) -> None:
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        if current and size + t.numel() * t.element_size() > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * t.element_size()
    shards.append(current)
    if len(shards) == 1:
        _save_file(shards[0], dst / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_file(shard, dst / fname)
        weight_map.update({n: fname for n in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def _last_line(exc: Exception) -> str:
    """dist_checkpointing wraps the cause in a multi-rank traceback: its last line names the tensor."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and ln.strip() != "'}"]
    return lines[-1] if lines else type(exc).__name__


CARD = """# {name}

A POLAR reward model (policy discriminator; Dou et al., "Pre-Trained Policy Discriminators are General
Reward Models", arXiv 2507.05197) exported by `polar convert engine-to-hf`.

- Class: `{arch}`{remote}
- Reward: one scalar, read at the final token. Input (no chat template; BOS first):
  `{{prompt}}\\n{{reference}}{sep}{{prompt}}\\n{{candidate}}{rtok}` (pretrain wrapper: without the two "\\n").
  The input must end with `{rtok}` (id {rtok_id}); the reference is a sample of the policy to compare with.
- Tokenizer: `tokenizer.json`, with `{sep}` (id {sep_id}) and `{rtok}` (id {rtok_id}) as special tokens;
  `polar_tokenizer.json` names POLAR's four special tokens.
- {layers} layers, hidden {hidden}, {heads} heads ({groups} key-value heads), vocabulary {vocab}, weights in {dtype}.
{serving}"""

# POLAR's rewards are unbounded (POLAR-7B: about 0 for a copy of the reference, -7 to -11 for bad candidates) and
# the paper's PPO uses them as they are. vLLM's classifier pooler ends in a sigmoid when num_labels < 2
# (model_executor/layers/pooler/activations.py, PoolerClassify), which would hand the RL loop sigmoid(r) in
# (0, 1), saturated for every poor candidate; POLAR's client reads /pooling as data[-1][0], a token-wise answer.
SERVING_HF = """
## Serving it so that POLAR's reward client gets the raw reward

vLLM applies an activation to a one-label classifier's output: a sigmoid (`num_labels` < 2), which
squashes every reward into (0, 1) (sigmoid(-7) = 0.0009, sigmoid(-11) = 0.00002): turn it off with
`use_activation`. POLAR's client (`RewardModelClient`, server_type "vllm") posts `{"input": [...]}` to
`/pooling` with no task and reads `data[-1][0]`, the last token's row of a token-wise answer, so the
pooling task must be `token_classify` (its last row is the final token's score, the reward).

```bash
# vLLM whose PoolerConfig has `task` (0.19 and later): a request without a task gets this task, and a
# classifier's default, `classify`, answers one row the client cannot read
vllm serve DIR --runner pooling --convert classify \\
  --pooler-config '{"task": "token_classify", "use_activation": false}'
# vLLM 0.11.1 to 0.18: /pooling without a task already runs `token_classify` (where `vllm serve --help`
# has no --pooler-config, the same JSON goes to --override-pooler-config)
vllm serve DIR --runner pooling --convert classify --pooler-config '{"use_activation": false}'
# vLLM before 0.11.1 has no `token_classify` task: use 0.11.1 or later
```

- SGLang: `python -m sglang.launch_server --model-path DIR --is-embedding`; `/classify` answers
  `[{"embedding": [r]}]` with r the score head at the last token and no activation; the client reads
  `embedding[0]` (server_type "sglang").

Check before training: score a candidate against an unrelated reference; a reward in (0, 1) for every
input means the activation is still on.
"""

SERVING_INTERNLM2 = """
## Serving it

The layout of POLAR's released models: serve it as POLAR's README does (vLLM `--task=reward`, SGLang
`--is-embedding`, lmdeploy), with InternLM2's modeling code beside these files and `--trust-remote-code`.
"""


def convert(src, dst, *, fmt: str = "hf", config: str | None = None, tokenizer: str | None = None,
            dtype: str = "float32", log=print) -> Path:
    if fmt not in ("hf", "internlm2-reward"):
        raise ConvertError(f"--format {fmt!r}: expected hf or internlm2-reward")
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConvertError(f"{dst}: exists and is not empty; choose a new directory")
    step = _step_dir(src)
    cfg_path, model = _model_config(step, config)
    with tempfile.TemporaryDirectory() as work:
        tok_dir = _tokenizer_dir(step, tokenizer, Path(work))
        tok = load_tokenizer(tok_dir)
        return _convert(step, dst, fmt, cfg_path, model, tok_dir, tok, dtype, log)


def _tokenizer_dir(step: Path, tokenizer: str | None, work: Path) -> Path:
    from polar.checkpoint_tokenizer import TokenizerMismatch, TokenizerNotFound, choose

    try:
        spec = choose(tokenizer, str(step), "--tokenizer")
    except TokenizerNotFound as e:
        raise ConvertError(f"{e} (--tokenizer DIR, or --tokenizer byte)") from None
    except TokenizerMismatch as e:
        raise ConvertError(str(e)) from None
    if spec == "byte":
        from polar.convert.byte_tokenizer import write_byte_tokenizer

        return write_byte_tokenizer(work / "tokenizer")
    return Path(spec)


def _convert(step: Path, dst: Path, fmt: str, cfg_path: Path, model, tok_dir: Path, tok, dtype: str, log) -> Path:
    from engine import checkpoint_load
    from engine.weights import export_canonical

    if tok.vocab_size > model.vocab_size:
        raise ConvertError(f"{tok_dir}: the tokenizer has {tok.vocab_size} tokens but {cfg_path} gives "
                           f"model.vocab_size={model.vocab_size}; pass the tokenizer the model was trained with")

    chunks, _ = build(model)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        checkpoint_load.load(str(step), chunks)
    except (Exception, CheckpointException) as e:
        raise ConvertError(f"{step}: the checkpoint does not match the model configuration in {cfg_path} "
                           f"({_last_line(e)}); pass the model.yaml or run config.yaml the checkpoint was written "
                           "with (--config)") from e
    tensors = export_canonical(chunks, model)
    del chunks
    tensors = {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}
    ids = dict(pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.pad_id)
    if fmt == "hf":
        hf = llama.from_canonical(tensors)
        hf_cfg = llama.hf_config(model, dtype=dtype, **ids)
        remote = " (plain transformers, vLLM and SGLang load it; no remote code)"
        serving = SERVING_HF
    else:
        hf = internlm2.from_canonical(tensors, model.num_query_groups)
        hf_cfg = internlm2.hf_config(model, reward_token_id=tok.reward_token_id, dtype=dtype, **ids)
        remote = (" (the layout of POLAR's released models; loading it needs InternLM2's modeling code "
                  "`configuration_internlm2.py` / `modeling_internlm2.py` from the InternLM2 / POLAR model "
                  "repositories, which is not shipped here: copy it beside these files and load with "
                  "trust_remote_code=True)")
        serving = SERVING_INTERNLM2
    partial = Partial(dst)
    try:
        _save_safetensors(hf, partial.claim())
        (partial.path / "config.json").write_text(json.dumps(hf_cfg, indent=1))
        copy_tokenizer(tok_dir, partial.path)
        (partial.path / "README.md").write_text(CARD.format(
            name=dst.name, arch=hf_cfg["architectures"][0], remote=remote, sep=tok.reward_sep_text,
            sep_id=tok.reward_sep_id, rtok=tok.reward_token_text, rtok_id=tok.reward_token_id,
            layers=model.num_layers, hidden=model.hidden_size, heads=model.num_attention_heads,
            groups=model.num_query_groups, vocab=model.vocab_size, dtype=dtype, serving=serving))
        partial.publish()
    except BaseException as e:  # KeyboardInterrupt too: nothing half-written stays behind
        partial.drop()
        if isinstance(e, OSError):
            raise write_failed(dst, e) from e
        raise
    log(f"wrote {dst} ({hf_cfg['architectures'][0]}, from {step})")
    return dst


def main(argv=None) -> int:
    ap = ArgumentParser(prog="polar convert engine-to-hf",
                                 description="an engine checkpoint (any layout) -> a transformers directory")
    ap.add_argument("src", help="a run directory, its checkpoints/ directory (the newest complete step) or one step "
                    "directory, as polar score --checkpoint takes")
    ap.add_argument("dst", help="new output directory")
    ap.add_argument("--format", default="hf", choices=["hf", "internlm2-reward"],
                    help="hf: LlamaForSequenceClassification (default); internlm2-reward: POLAR's released "
                    "layout")
    ap.add_argument("--config", default=None,
                    help="model.yaml or run config.yaml (default: the settings recorded with SRC)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer directory, or byte (default: SRC's tokenizer/, else the one its run trained with)")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weight dtype to write")
    args = ap.parse_args(argv)
    from engine.quiet import silence_known_warnings

    silence_known_warnings()
    try:
        convert(args.src, args.dst, fmt=args.format, config=args.config, tokenizer=args.tokenizer, dtype=args.dtype)
    except ConvertError as e:
        print(f"polar convert engine-to-hf: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
