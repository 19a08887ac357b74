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


class _CalledAs:
    """The fine-tuning recipe with the program name its usage and errors lead with: its CLI says
    `polar finetune`, which `python engine/finetune.py --bogus` was told it had typed."""

    def __init__(self, recipe, prog: str):
        self._recipe, self.CLI = recipe, {**recipe.CLI, "prog": prog}

    def __getattr__(self, name):
        return getattr(self._recipe, name)


def main(argv=None) -> int:
    from engine.called_as import called_as
    from polar import finetune_recipe

    prog = called_as(__spec__, finetune_recipe.CLI["prog"])
    return _main(argv, recipe=finetune_recipe if prog == finetune_recipe.CLI["prog"]
                 else _CalledAs(finetune_recipe, prog))


if __name__ == "__main__":
    sys.exit(main())
