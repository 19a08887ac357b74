"""The table of a benchmark that run_all.sh cut at its stage's limit, from the JSON it wrote as each
run ended: benchmarks/e2e.py and benchmarks/fp8.py print their tables only at the end, so a cut run
left only its JSON (the ~1B shape's MFU and ratio, the FP8 variants that finished).

    python3 tests/gpu/partial_tables.py e2e|fp8 FILE.json      (appended to the stage's .md)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def e2e(doc: dict) -> None:
    from benchmarks.e2e import print_table, ratio_rows

    rows = doc.get("rows", [])
    print_table(f"E2E cut at the stage's limit: the {len(rows)} runs that ended, from its JSON; {doc.get('device')}, "
                f"torch {doc.get('torch')}, transformers {doc.get('transformers')}; engine {doc.get('steps')} steps, "
                f"baseline timed steps as given; settings: {' '.join(doc.get('settings', []))}", rows, ratio_rows(rows))


def fp8(doc: dict) -> None:
    from benchmarks.fp8 import print_table

    rows = doc.get("rows", [])
    print_table(f"FP8 cut at the stage's limit: the {len(rows)} variants that ended, from its JSON; {doc.get('device')}, "
                f"torch {doc.get('torch')}, {doc.get('steps')} steps; settings: {' '.join(doc.get('settings', []))}", rows)


def main(argv: list[str]) -> int:
    kind, path = argv
    {"e2e": e2e, "fp8": fp8}[kind](json.loads(Path(path).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
