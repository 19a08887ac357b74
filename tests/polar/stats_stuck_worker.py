"""A shard summary that never ends once it has created the file named by POLAR_TEST_STUCK: a
`polar data stats --workers N` pass caught mid-way (tests/polar/test_data_stats_signals.py). A
module of its own: a spawned worker imports the function by name."""
import os
import time


def stuck(shard):
    open(os.environ["POLAR_TEST_STUCK"], "w").close()
    time.sleep(3600)
