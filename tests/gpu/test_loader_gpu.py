"""engine.data.GlobalBatchLoader on a GPU: the batches it reads ahead are page-locked (so the
step's host-to-device copies are asynchronous), equal to those read in the step's thread, and the
reading thread works on the step's device (a thread left on device 0 would give every rank of a
node a CUDA context on GPU 0)."""
import threading

import numpy as np
import torch

from engine.data import GlobalBatchLoader, PackedGroups
from tests.engine.dist_worker import random_groups


def test_read_ahead_batches_are_pinned_on_the_steps_device():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    data = PackedGroups(random_groups(3, 40, 64, 64), 64)
    ahead = GlobalBatchLoader(data, 8, 2, 0, 1, seed=1, pad_id=0, pin_memory=device)
    plain = GlobalBatchLoader(data, 8, 2, 0, 1, seed=1, pad_id=0)
    for _ in range(3):
        got, want = ahead.next_microbatches(), plain.next_microbatches(prefetch=False)
        assert all(b.tokens.is_pinned() and b.layout.is_pinned() for b in got)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.to(device).tokens.cpu().numpy(), w.tokens.numpy())
    # on a machine with one GPU the last device is 0, so this part only bites with several
    seen = ahead._reader.submit(lambda: (torch.cuda.current_device(), threading.current_thread().name)).result()
    assert seen == (device.index, "batch-reader_0")
    ahead.close()
