"""Reading a transformers checkpoint directory: config.json and the weights, tensor by tensor.

Weights are read from safetensors (one `model.safetensors`, or every tensor of the shards
`model.safetensors.index.json` names, as transformers reads them) lazily, one tensor at a time, so
a large model never sits in memory twice. A GGUF file is read through transformers' own GGUF
loader (which dequantizes it to float and returns a regular model), since GGUF tensor names and
quantized layouts are that loader's business.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message says what is wrong and what to do."""


def _read_json(path: Path) -> dict:
    """A JSON object file; anything else (unreadable, not JSON, a list) is a ConvertError naming it."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot be read ({e})") from e
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from e
    except (RecursionError, ValueError) as e:  # nesting or an integer too long for json to decode
        raise ConvertError(f"{path}: JSON that cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: must hold a JSON object, got {type(obj).__name__}")
    return obj


def _safe_open(path: Path):
    """safe_open, with a corrupt or truncated file reported as a ConvertError naming it (the library
    raises its own SafetensorError, which the command line would show as a traceback)."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, OSError: the file, not the caller, is at fault
        raise ConvertError(f"{path}: not a readable safetensors file ({e}); is it complete? download it "
                           "again") from e


class HFCheckpoint:
    """config (the dict of config.json), names(), get(name) -> tensor, where(name) -> file."""

    def __init__(self, src: str | Path, gguf_file: str | None = None):
        src = Path(src)
        if src.is_file() and src.suffix == ".gguf":
            src, gguf_file = src.parent, src.name
        if not src.is_dir():
            raise ConvertError(f"{src}: no such checkpoint directory")
        self.src = src
        self.gguf_file = gguf_file
        self._tensors: dict[str, torch.Tensor] = {}  # GGUF: everything is loaded at once
        self._files: dict[str, Path] = {}  # safetensors: tensor name -> file
        self._open: dict[Path, object] = {}
        if gguf_file is None:
            ggufs = sorted(p.name for p in src.glob("*.gguf"))
            if not (src / "config.json").is_file() and len(ggufs) == 1:
                gguf_file = self.gguf_file = ggufs[0]
        if gguf_file is not None:
            self._load_gguf(gguf_file)
        else:
            self._index_safetensors()

    # ---- safetensors -------------------------------------------------------------------------
    def _index_safetensors(self) -> None:
        src = self.src
        cfg = src / "config.json"
        if not cfg.is_file():
            raise ConvertError(f"{src}: no config.json; a transformers checkpoint directory holds config.json "
                               "beside its weights (or pass a .gguf file)")
        self.config = _read_json(cfg)
        quant = self.config.get("quantization_config")
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        # quantized layouts (GPTQ's qweight, FP8 with scales, ...) would otherwise be reported as missing
        # or unplaceable tensors, as if the download were incomplete. "gguf": transformers dequantizes
        # a GGUF file on loading, so a model saved from one holds float weights (and keeps this entry)
        if quant and method != "gguf":
            raise ConvertError(f"{cfg}: quantization_config (quant_method {method!r:.40}): quantized weights are "
                               "not supported; convert the unquantized (float) checkpoint")
        index = src / "model.safetensors.index.json"
        single = src / "model.safetensors"
        if index.is_file() and single.is_file():
            # transformers loads the single file and ignores the index; save_pretrained leaves either kind
            # behind when a directory is saved again in the other, so either may be the stale one
            raise ConvertError(f"{src}: holds both model.safetensors and {index.name} (with its shards); "
                               "transformers loads model.safetensors: remove whichever is not the model")
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if (not isinstance(weight_map, dict) or not weight_map
                    or not all(isinstance(f, str) for f in weight_map.values())):
                raise ConvertError(f"{index}: no 'weight_map' of tensor names to shard files")
            missing = sorted({f for f in weight_map.values() if not (src / f).is_file()})
            if missing:
                raise ConvertError(f"{src / missing[0]}: listed in {index.name} but missing ({len(missing)} shard(s) "
                                   "missing in all); download the checkpoint again or copy the missing shards")
            self._files = self._shard_contents(index, weight_map)
        elif single.is_file():
            with _safe_open(single) as f:
                self._files = {name: single for name in f.keys()}
        else:
            other = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
            hint = (f" (found {other[0]}: load it with transformers and save_pretrained(..., "
                    "safe_serialization=True) to get safetensors)") if other else ""
            raise ConvertError(f"{src}: no model.safetensors or model.safetensors.index.json{hint}")

    def _shard_contents(self, index: Path, weight_map: dict) -> dict[str, Path]:
        """Tensor name -> shard file, from the headers of the shards the index names. transformers reads
        every tensor of those files, the index only choosing the files: a tensor its weight_map leaves
        out is still the model's (needed, or refused as unsupported, never dropped), and one it lists
        in a shard that lacks it would start at random there, so it is refused here."""
        held: dict[str, Path] = {}
        for name in sorted(set(weight_map.values())):
            path = self.src / name
            self._open[path] = _safe_open(path)
            for tensor in self._open[path].keys():
                if tensor in held:
                    raise ConvertError(f"{path}: tensor {tensor!r} is also in {held[tensor]}; which one is the "
                                       "model's? download the checkpoint again")
                held[tensor] = path
        absent = sorted(set(weight_map) - set(held))
        if absent:
            raise ConvertError(f"{index}: lists tensor {absent[0]!r} in {weight_map[absent[0]]}, which does not hold "
                               f"it ({len(absent)} such tensor{'s' * (len(absent) > 1)}); download the checkpoint "
                               "again")
        return held

    # ---- GGUF --------------------------------------------------------------------------------
    def _load_gguf(self, name: str) -> None:
        if not (self.src / name).is_file():
            raise ConvertError(f"{self.src / name}: no such GGUF file")
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as e:
            raise ConvertError("reading GGUF needs transformers, gguf and accelerate: "
                               "pip install transformers gguf accelerate") from e
        model = AutoModelForCausalLM.from_pretrained(str(self.src), gguf_file=name, dtype=torch.float32)
        self.config = model.config.to_dict()
        self.config["architectures"] = [type(model).__name__]
        self._tensors = {k: v.detach() for k, v in model.state_dict().items()}
        if self.config.get("tie_word_embeddings"):
            self._tensors.pop("lm_head.weight", None)

    # ---- access ------------------------------------------------------------------------------
    def names(self) -> set[str]:
        return set(self._tensors) | set(self._files)

    def where(self, name: str) -> str:
        if name in self._files:
            return str(self._files[name])
        return str(self.src / (self.gguf_file or ""))

    def get(self, name: str) -> torch.Tensor:
        if name in self._tensors:
            return self._tensors[name]
        if name not in self._files:
            raise ConvertError(f"{self.src}: the checkpoint has no tensor {name!r}")
        path = self._files[name]
        if path not in self._open:  # shards are opened when first read: a corrupt one fails here
            self._open[path] = _safe_open(path)
        handle = self._open[path]
        try:
            return handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error type for an absent name
            raise ConvertError(f"{path}: has no tensor {name!r} although the index lists it there ({e})") from e
