"""Scores packed groups with a converted engine checkpoint at one parallel layout (under torchrun);
every rank writes the rewards it holds, so the test sees that all ranks agree."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args()

    import torch.distributed as dist

    from engine import checkpoint, checkpoint_load
    from engine.scoring import score_data_parallel
    from polar.convert.engine_io import build, read_model_config
    from tests.polar.convert.helpers import pack

    data = pickle.loads(open(args.data, "rb").read())
    model = read_model_config(os.path.join(args.ckpt, "model.yaml"))
    chunks, rt = build(model, args.tp, args.pp)
    checkpoint_load.load(checkpoint.latest(args.ckpt), chunks)
    rewards = score_data_parallel(chunks, pack(data["groups"], data["per_sequence"], data["pad_id"]), rt)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rewards.tolist())
    if rt.rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    from engine.runtime import shutdown_runtime

    shutdown_runtime()


if __name__ == "__main__":
    main()
