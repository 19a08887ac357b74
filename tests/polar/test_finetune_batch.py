"""What a fine-tuning step carries against the paper's batch (Sec. 3: 320 sequences, 160 records):
train.global_batch counts packed sequences of several records, and the run says, once at start-up,
how many records that is on its data and which global_batch carries 160."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from polar.format import encode_groups
from polar.tokenizer import ByteTokenizer
from tests.polar.test_finetune_recipe import _init_step

ROOT = Path(__file__).parents[2]
SEQ = 1024


def _record(i: int) -> dict:
    # every record the same length, so that a pack holds a number of them known without the packer
    return {"prompt": f"question {i:04d}", "reference": "a reference answer", "chosen": f"good {i:04d}",
            "rejected": f"bad {i:04d}", "wrapper": "sft"}


def _group_length(rec: dict) -> int:
    enc = encode_groups(ByteTokenizer(), [rec["prompt"]], [rec["reference"]], [[rec["chosen"], rec["rejected"]]],
                        rec["wrapper"])[0]
    return len(enc.prefix) + sum(len(c) for c in enc.candidates)


def _check_config(tmp_path: Path, n: int, global_batch: int, world_size: int = 1) -> str:
    records = [_record(i) for i in range(n)]
    src = tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    step = _init_step(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "engine" / "finetune.py"), f"checkpoint.init_from={step}",
                           f"finetune.train={src}", "finetune.tokenizer=byte", "finetune.eval_fraction=0",
                           f"data.seq_length={SEQ}", f"train.global_batch={global_batch}",
                           f"run_dir={tmp_path / 'run'}", "--check-config"],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE=str(world_size)),
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("n, global_batch", [(1000, 8), (100, 2)])
def test_the_run_says_what_a_step_carries_against_the_papers_160_records(tmp_path, n, global_batch):
    g = _group_length(_record(0))
    assert all(_group_length(_record(i)) == g for i in (1, n - 1))
    per_pack = n / math.ceil(n / (SEQ // g))  # whole packs of SEQ // g records, the last one the rest
    assert per_pack > 2  # a pack is not one record: the default batch is not the paper's
    out = _check_config(tmp_path, n, global_batch)
    lines = [line for line in out.splitlines() if line.startswith("batch: ")]
    assert len(lines) == 1, out
    m = re.fullmatch(r"batch: train\.global_batch=(\d+) packed sequences carry ~([\d,.]+) records "
                     r"\(~([\d,.]+) RM sequences\) a step, ([\d.]+) records a pack of this data; the paper's "
                     r"fine-tuning batch is 160 records \(320 sequences\): train\.global_batch=(\d+) carries it(.*)",
                     lines[0])
    assert m, lines[0]
    records = float(m[2].replace(",", ""))
    assert int(m[1]) == global_batch
    assert records == pytest.approx(global_batch * per_pack, abs=0.05)
    # chosen and rejected: two RM sequences a record
    assert float(m[3].replace(",", "")) == pytest.approx(2 * global_batch * per_pack, abs=0.05)
    assert float(m[4]) == pytest.approx(per_pack, abs=0.005)
    assert int(m[5]) == round(160 / per_pack)
    packs = math.ceil(n / (SEQ // g))
    # 100 records fill fewer packs than one batch of 160 records needs: said, not left to be found
    assert (m[6] == f"; this data's {n:,} records fill only {packs:,}, less than one such batch") == (n < 160)
    assert (m[6] == "") == (n >= 160)


def test_the_batch_it_names_is_one_the_layout_accepts(tmp_path):
    """With two data-parallel ranks the line named train.global_batch=11 (160 records at 14.93 a pack),
    which the same run then refused: not divisible by data-parallel size 2 x train.micro_batch=1."""
    out = _check_config(tmp_path, 1000, 8, world_size=2)
    line = next(x for x in out.splitlines() if x.startswith("batch: "))
    named = int(re.search(r"train\.global_batch=(\d+) carries it \(a multiple of 2, as this layout needs\)", line)[1])
    assert named % 2 == 0 and abs(named * 1000 / math.ceil(1000 / (SEQ // _group_length(_record(0)))) - 160) < 2 * 15
    (tmp_path / "again").mkdir()
    _check_config(tmp_path / "again", 1000, named, world_size=2)  # accepted (returncode 0, asserted there)

