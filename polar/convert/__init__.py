"""Checkpoint conversion between transformers checkpoints and the engine's (`polar convert ...`).

    hf_to_engine   a transformers checkpoint (Llama, Mistral, Qwen2, InternLM2, InternLM2ForRewardModel;
                   safetensors or GGUF) -> an engine checkpoint with its model.yaml and tokenizer
    engine_to_hf   an engine checkpoint -> LlamaForSequenceClassification or POLAR's
                   InternLM2ForRewardModel layout
"""

import sys

_COMMANDS = {"hf-to-engine": "polar.convert.hf_to_engine", "engine-to-hf": "polar.convert.engine_to_hf"}


def main(argv=None) -> int:
    """`polar convert {hf-to-engine,engine-to-hf} ...`: hands the rest of argv to the sub-command."""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _COMMANDS:
        print("usage: polar convert {hf-to-engine,engine-to-hf} SRC DST [options]  (-h after a sub-command "
              "for its options)", file=sys.stderr)
        return 2
    return importlib.import_module(_COMMANDS[argv[0]]).main(argv[1:])
