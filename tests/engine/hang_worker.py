"""A torchrun worker that never ends, for tests/engine/test_torchrun_scenario.py: each rank writes its
pid to OUT.pidN, then waits for good (as a rank waiting in a collective for a peer that never comes)."""
import argparse
import os
import time

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
args, _ = ap.parse_known_args()
with open(f"{args.out}.pid{os.environ.get('RANK', '0')}", "w") as f:
    f.write(str(os.getpid()))
while True:
    time.sleep(60)
