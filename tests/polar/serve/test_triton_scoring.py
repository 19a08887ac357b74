"""Scoring with the Triton attention, as `polar serve` does on a GPU (several groups per packed
row, pack_rows on): interpreted on CPU, in a child process (Triton reads TRITON_INTERPRET when a
kernel is decorated), the rewards equal the blocks attention's, scored one group per row, for the
same random model (RewardScorer.random seeds the model's initialisation again for the second
scorer of the process)."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))

CHILD = r"""
import json
from benchmarks.serve_prefix import make_items
from engine.inference import RewardScorer
from polar.serve.batcher import Batcher
from polar.serve.items import format_structured
from polar.tokenizer import ByteTokenizer

tok = ByteTokenizer()
# interpreted Triton costs per program (query tiles x heads x layers): 2 query heads over 1 key-value
# head is still GQA, and 3 groups of 3 rollouts of 45 tokens (a 34-token shared prefix over several
# 16-token tiles, 11-token candidates straddling tile edges) still fill one 256-token row together
model = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "num_query_groups": 1,
         "ffn_hidden_size": 64, "vocab_size": tok.vocab_size}
ids = [i for _, i in format_structured(tok, make_items(3, 3, 10, 10, 10, seed=0), 16384, 4096)]
out = {}
for backend, pack_rows in (("blocks", False), ("triton", True)):
    scorer = RewardScorer.random(model, attention_backend=backend, seed=7)
    assert scorer.attention_backend == backend
    rows = []  # rows per forward, and groups in them

    def score(batch, score=scorer.score):
        rows.append((batch.tokens.shape[0], batch.num_groups))
        return score(batch)

    b = Batcher(score, tok.pad_id, max_wait_s=0, max_batch_tokens=4096, row_tokens=256,
                share_prefixes=True, pack_rows=pack_rows, max_positions=scorer.max_positions).start()
    try:
        out[backend] = {"rewards": b.score_sync(ids).tolist(), "rows": rows}
    finally:
        b.close()
print(json.dumps(out))
"""


def test_triton_attention_scores_packed_rows_like_the_blocks_attention():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    blocks, triton = np.array(out["blocks"]["rewards"]), np.array(out["triton"]["rewards"])
    assert blocks.shape == (9,) and np.ptp(blocks) > 0  # 9 rollouts, not all scored alike
    np.testing.assert_allclose(triton, blocks, rtol=1e-5, atol=1e-6)
    # one group per row, then several groups in a row
    assert all(r == g for r, g in out["blocks"]["rows"]) and any(r < g for r, g in out["triton"]["rows"]), out
