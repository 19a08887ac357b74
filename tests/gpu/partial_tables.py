"""The table of a benchmark that run_all.sh cut at its stage's limit, from the JSON it wrote as each
run ended: benchmarks/e2e.py and benchmarks/fp8.py print their tables only at the end, so a cut run
left only its JSON (the ~1B shape's MFU and ratio, the FP8 variants that finished).

    python3 tests/gpu/partial_tables.py e2e|fp8 FILE.json      (appended to the stage's .md)
    python3 tests/gpu/partial_tables.py row e2e|fp8 FILE.json  (the stage's row of the table: its figures)
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
    print_table(f"FP8 cut at the stage's limit: the {len(rows)} variants that ended, from its JSON; "
                f"{doc.get('device')}, torch {doc.get('torch')}, {doc.get('steps')} steps; "
                f"settings: {' '.join(doc.get('settings', []))}", rows)


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{x:.1%}"


def e2e_row(doc: dict) -> str:
    """Per shape: the engine's triplets/s and MFU (measured and datasheet peak), its ratio to each
    baseline that ran, or the exit of a run that did not end."""
    from benchmarks.e2e import ratio_rows

    ratios, out = ratio_rows(doc.get("rows", [])), []
    for r in doc.get("rows", []):
        if r["trainer"] != "engine":
            if "triplets_per_s" not in r:
                out.append(f"{r['shape']} {r['trainer']}: exit {r['exit']}")
            continue
        if "triplets_per_s" not in r:
            out.append(f"{r['shape']} engine: exit {r['exit']}")
            continue
        vs = ", ".join(f"{q['triplets_per_s']:.2f}x {q['baseline']}" for q in ratios if q["shape"] == r["shape"])
        out.append(f"{r['shape']}: engine {r['triplets_per_s']:,.1f} triplets/s, MFU {_pct(r.get('mfu'))} "
                   f"(datasheet {_pct(r.get('mfu_datasheet'))}), {vs or 'no baseline ended'}")
    return "; ".join(out) or "no run ended"


def fp8_row(doc: dict) -> str:
    """Each variant's tokens/s against the first (bf16) and its loss after the steps, relative."""
    rows = doc.get("rows", [])
    base = rows[0] if rows and "tokens_per_s" in rows[0] else None
    out = []
    for r in rows:
        if "tokens_per_s" not in r:
            out.append(f"{r['variant']}: exit {r['exit']}")
        elif r is base:
            out.append(f"{r['variant']} {r['tokens_per_s']:,.0f} tok/s, loss {r['loss_last10']:.4f} "
                       f"after {r['steps']} steps")
        elif base:
            out.append(f"{r['variant']} {r['tokens_per_s'] / base['tokens_per_s']:.2f}x, "
                       f"loss {(r['loss_last10'] - base['loss_last10']) / base['loss_last10']:+.2%}")
        else:
            out.append(f"{r['variant']} {r['tokens_per_s']:,.0f} tok/s (no bf16 row to compare)")
    if rows and not any(r["variant"].startswith("TE ") for r in rows):  # fp8.py runs them where TE imports
        out.append("TE variants not run: transformer_engine does not import")
    return "; ".join(out) or "no variant ended"


def main(argv: list[str]) -> int:
    if argv[0] == "row":
        _, kind, path = argv
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"no figures: {kind} left no JSON ({type(e).__name__})")
            return 0
        print({"e2e": e2e_row, "fp8": fp8_row}[kind](doc))
        return 0
    kind, path = argv
    {"e2e": e2e, "fp8": fp8}[kind](json.loads(Path(path).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
