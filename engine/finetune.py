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
    """The fine-tuning recipe with the program name its usage and errors lead with (None: how it was
    called, engine.pretrain.invoked_as): its CLI says `polar finetune`, which `python engine/finetune.py
    --bogus` was told it had typed."""

    def __init__(self, recipe, prog):
        self._recipe, self.CLI = recipe, {**recipe.CLI, "prog": prog}

    def __getattr__(self, name):
        return getattr(self._recipe, name)


def main(argv=None) -> int:
    from polar import finetune_recipe

    # run itself (polar's launches, torchrun's workers, a user's file or -m), it is named as
    # engine/pretrain.py is: `polar finetune` under polar, else as typed (engine.called_as named any -m
    # run `polar finetune`, and the file by its base name where pretrain names the path typed)
    return _main(argv, recipe=_CalledAs(finetune_recipe, None) if __name__ == "__main__" else finetune_recipe)


if __name__ == "__main__":
    sys.exit(main())
