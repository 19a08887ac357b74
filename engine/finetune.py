#!/usr/bin/env python3
"""POLAR fine-tuning entry point (paper Sec. 3, Eq. 8): the pre-training entry with the fine-tuning
recipe (polar/finetune_recipe.py: preference records, the paper's defaults, a held-out split).

    torchrun --nproc_per_node 2 engine/finetune.py checkpoint.init_from=runs/default/checkpoints \\
        finetune.train=prefs.jsonl [section.key=value ...]
    polar finetune --nproc 2 checkpoint.init_from=... finetune.train=...      # the same
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.pretrain import main as _main  # noqa: E402


def main(argv=None, prog: str | None = None) -> int:
    """`prog`: the name in the usage and errors, default how this entry was called (engine.called_as:
    `polar finetune` under polar, else the path typed or `python -m engine.finetune`)."""
    from engine.called_as import called_as
    from polar import finetune_recipe

    return _main(argv, recipe=finetune_recipe, prog=called_as("engine.finetune", prog))


if __name__ == "__main__":
    sys.exit(main())
