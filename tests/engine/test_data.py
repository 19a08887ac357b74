"""engine.data.GlobalBatchLoader: the order is one stream of per-epoch permutations, so no sequence is
dropped at an epoch's end and a resumed loader continues exactly; a resume with another data order
is refused."""
from __future__ import annotations

import numpy as np
import pytest

from engine.config import ConfigError
from engine.data import GlobalBatchLoader, PackedGroups
from tests.engine.dist_worker import random_groups


@pytest.fixture(scope="module")
def source():
    data = PackedGroups(random_groups(3, 40, 64, 64), 64)
    assert len(data) == 17  # not a multiple of the batches below but 1
    return data


def loader(source, global_batch, seed=1, dp_rank=0, dp_size=1):
    return GlobalBatchLoader(source, global_batch, 1, dp_rank, dp_size, seed=seed, pad_id=0)


@pytest.mark.parametrize("global_batch", [1, 8, 12, 17])
def test_one_epoch_of_batches_trains_every_sequence(source, global_batch):
    """ceil(N/G) batches (what fine-tuning runs for one epoch) hold every sequence at least once and
    repeat at most G-1, those of the last batch's fill; exactly once when G divides N."""
    n = len(source)
    steps = -(-n // global_batch)
    seen = np.concatenate([loader(source, global_batch).global_batch_indices(b) for b in range(steps)])
    counts = np.bincount(seen, minlength=n)
    assert counts.min() >= 1
    assert len(seen) - n <= global_batch - 1
    if n % global_batch == 0:
        assert (counts == 1).all()


def test_the_stream_is_consecutive_permutations(source):
    """Batch after batch, every run of N positions is one epoch's permutation, each epoch another."""
    n, g = len(source), 12
    ld = loader(source, g)
    stream = np.concatenate([ld.global_batch_indices(b) for b in range(4 * n // g + 1)])
    epochs = [stream[e * n:(e + 1) * n] for e in range(4)]
    assert all(sorted(e.tolist()) == list(range(n)) for e in epochs)
    assert len({tuple(e.tolist()) for e in epochs}) == 4
    assert ld.epoch == 0.0 and loader(source, 17).global_batch_indices(1).tolist() == epochs[1].tolist()


def test_resumed_loader_continues_the_uninterrupted_one(source):
    straight = loader(source, 8)
    batches = [np.concatenate([mb.tokens.numpy() for mb in straight.next_microbatches()]) for _ in range(7)]
    first = loader(source, 8)
    for _ in range(3):
        first.next_microbatches()
    # a fresh loader (no cached order) at another data-parallel size, crossing epoch boundaries
    resumed = [loader(source, 8, dp_rank=r, dp_size=2) for r in range(2)]
    for ld in resumed:
        ld.load_state_dict(first.state_dict())
    for b in range(3, 7):
        got = np.concatenate([mb.tokens.numpy() for ld in resumed for mb in ld.next_microbatches()])
        np.testing.assert_array_equal(got, batches[b], err_msg=f"batch {b}")


@pytest.mark.parametrize("kwargs,needle", [
    ({"global_batch": 8}, "train.global_batch: 4 when saved, 8 now"),
    ({"seed": 2}, "train.seed: 1 when saved, 2 now"),
])
def test_a_resume_with_another_order_is_refused(source, kwargs, needle):
    saved = loader(source, 4)
    saved.next_microbatches()
    other = loader(source, **{"global_batch": 4, **kwargs})
    with pytest.raises(ConfigError, match=needle):
        other.load_state_dict(saved.state_dict())


def test_a_resume_on_other_data_is_refused(source):
    saved = loader(source, 4).state_dict()
    smaller = PackedGroups(random_groups(3, 30, 64, 64), 64)
    with pytest.raises(ConfigError, match=f"the training data, its packed sequence count: 17 when saved, "
                                          f"{len(smaller)} now"):
        loader(smaller, 4).load_state_dict(saved)
    named = r"\(the training data \(data.path=ds/\), its packed sequence count: 17 "
    with pytest.raises(ConfigError, match=named) as e:
        loader(smaller, 4).load_state_dict(saved, "the training data (data.path=ds/)")
    # named once, before both of its figures (it was named before each)
    assert str(e.value).count("data.path=ds/") == 1 and "; a digest of its packed sequences' token counts: " \
        in str(e.value), str(e.value)


def test_a_resume_on_other_data_of_the_same_size_is_refused(source):
    """Other records that pack into as many sequences (fine-tuning with another finetune.seed holds
    out other records) would continue another order: the data's digest tells them apart."""
    saved = loader(source, 4).state_dict()
    other = PackedGroups(random_groups(5, 40, 64, 64), 64)
    assert len(other) == len(source)
    with pytest.raises(ConfigError, match="a digest of its packed sequences' token counts"):
        loader(other, 4).load_state_dict(saved)
    loader(PackedGroups(random_groups(3, 40, 64, 64), 64), 4).load_state_dict(saved)  # the same data


class CountsOnly:
    """A source of many sequences known only by their per-sequence counts (nothing is read)."""

    def __init__(self, per_sequence: dict):
        self.per_sequence, self.seq_length = per_sequence, 64

    def __len__(self):
        return len(self.per_sequence["tokens"])


def test_the_data_digest_reads_narrow_counts_as_the_int64_they_stand_for():
    """Checkpoints hold the digest of every count column's int64 bytes; columns kept narrower
    (int16) and hashed a piece at a time must give the very same digest, or every resume of a run
    saved before would be refused."""
    import hashlib
    rng = np.random.default_rng(0)
    n = (1 << 20) * 2 + 12345  # past the pieces the digest is taken in
    wide = {"tokens": rng.integers(1, 16384, n), "groups": rng.integers(1, 30, n)}
    h = hashlib.sha1()
    for key in sorted(wide):
        h.update(key.encode())
        h.update(wide[key].astype(np.int64).tobytes())
    narrow = CountsOnly({k: v.astype(np.int16) for k, v in wide.items()})
    assert loader(narrow, 4).data_digest() == h.hexdigest()[:16]
    wide["groups"][n - 1] += 1  # the last piece is hashed too
    assert loader(CountsOnly(wide), 4).data_digest() != h.hexdigest()[:16]


def test_a_resume_digests_the_training_data_once(monkeypatch):
    """A resume checks the loader state on every rank twice, each with a loader of its own: the entry
    script's check before the trainer (engine.pretrain.check_resume_data), then the trainer's. The
    digest is a pass over every sequence's counts (~10 s a rank at POLAR's 2*10^8 sequences): the
    second loader takes the first's, as does a save. The bytes hashed are counted: each column's once."""
    import hashlib

    import engine.data

    hashed = []

    class Counted:
        def __init__(self):
            self.h = hashlib.sha1()

        def update(self, b):
            hashed.append(memoryview(b).nbytes)
            self.h.update(b)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(engine.data, "hashlib", type("hashlib", (), {"sha1": Counted}))
    n = 3 * (1 << 20) + 5
    data = CountsOnly({"tokens": np.full(n, 9, np.int16), "groups": np.ones(n, np.int16)})
    one_pass = 2 * n * 8  # two columns of int64
    saved = loader(data, 4).state_dict()
    assert sum(hashed) - len("groups") - len("tokens") == one_pass
    for _ in range(2):  # the entry script's check, then the trainer's
        loader(data, 4).load_state_dict(saved)
    loader(data, 4).state_dict()  # the trainer's first save
    assert sum(hashed) - len("groups") - len("tokens") == one_pass


@pytest.mark.parametrize("edit", ["token", "label"])
def test_a_resume_on_records_edited_in_place_is_refused(source, edit):
    """An edited record that keeps its length changes no count the data digest reads; the token
    digest (data held in memory) tells it apart, naming what changed."""
    saved = loader(source, 4).state_dict()
    groups = random_groups(3, 40, 64, 64)
    if edit == "token":
        groups[7].candidates[1][0] = groups[7].candidates[1][0] % 63 + 1
    else:
        groups[7].labels = 1 - groups[7].labels
    edited = PackedGroups(groups, 64)
    assert edited.per_sequence["tokens"].tolist() == source.per_sequence["tokens"].tolist()
    with pytest.raises(ConfigError, match="other token ids or labels .* a record edited in place"):
        loader(edited, 4).load_state_dict(saved)
    # named as the entry script names it (it said only 'the training data')
    with pytest.raises(ConfigError, match=r"^the training data \(finetune.train=p.jsonl\) changed since"):
        loader(edited, 4).load_state_dict(saved, "the training data (finetune.train=p.jsonl)")
    without = {k: v for k, v in saved.items() if k != "tokens_digest"}  # saved before the token digest
    loader(edited, 4).load_state_dict(without)


def test_a_state_saved_without_its_settings_still_loads(source):
    ld = loader(source, 4)
    ld.load_state_dict({"consumed_batches": 5})
    assert ld.state.consumed_batches == 5


def test_fewer_sequences_than_a_batch_is_a_config_error(source):
    with pytest.raises(ConfigError, match="train.global_batch=18: the data packs into only 17 sequences"):
        loader(source, 18)


class WatchedSource:
    """`source`, recording which thread reads which sequences; `fail_at` makes reading it raise."""

    def __init__(self, source, fail_at=None):
        self.inner, self.fail_at, self.reads = source, fail_at, []
        self.seq_length, self.per_sequence = source.seq_length, source.per_sequence
        self.tokens_digest = source.tokens_digest

    def __len__(self):
        return len(self.inner)

    def sequences(self, indices):
        import threading
        indices = [int(i) for i in indices]
        self.reads.append((threading.current_thread().name, indices))
        if self.fail_at in indices:
            raise OSError(f"shard unreadable at sequence {self.fail_at}")
        return self.inner.sequences(indices)


def test_the_next_batch_is_read_ahead_in_another_thread_and_changes_nothing(source):
    """Prefetching reads batch b+1 in the reading thread while step b runs; the batches, and the
    state a checkpoint saves, are those of a loader that reads each batch when asked."""
    watched = WatchedSource(source)
    ahead, plain = loader(watched, 8), loader(source, 8)
    for b in range(6):  # across epoch boundaries (17 sequences, 8 a batch)
        got = ahead.next_microbatches()
        want = plain.next_microbatches(prefetch=False)
        for g, w in zip(got, want, strict=True):  # a micro-batch missing from either fails
            for name in ("tokens", "layout", "reward_index"):
                np.testing.assert_array_equal(getattr(g, name).numpy(), getattr(w, name).numpy(), err_msg=f"{b} {name}")
        assert ahead.last_global == plain.last_global and ahead.state_dict() == plain.state_dict()
        ahead._ahead[b + 1].result()  # batch b+1 was read before it was asked for
        assert watched.reads[-1] == ("batch-reader_0", [int(ahead.global_batch_indices(b + 1)[-1])])
    assert all(thread.startswith("batch-reader") for thread, _ in watched.reads)
    ahead.close()
    assert not ahead._ahead and ahead._reader is None


def test_a_resume_drops_the_batches_read_ahead(source):
    ld = loader(source, 8)
    ld.next_microbatches()  # batch 1 read ahead
    ld.load_state_dict({"consumed_batches": 5})
    got = np.concatenate([mb.tokens.numpy() for mb in ld.next_microbatches()])
    want = np.concatenate([mb.tokens.numpy() for mb in loader(source, 8).microbatches(5)])
    np.testing.assert_array_equal(got, want)


def test_an_error_reading_a_batch_reaches_the_step_that_needs_it(source):
    """A failed read ahead does not pass unseen, nor fail the step before it: the step that would
    train on the batch raises the reader's error."""
    bad = int(loader(source, 8).global_batch_indices(1)[0])
    ld = loader(WatchedSource(source, fail_at=bad), 8)
    ld.next_microbatches()  # batch 0 is fine; batch 1 fails in the reading thread
    with pytest.raises(OSError, match=f"shard unreadable at sequence {bad}"):
        ld.next_microbatches()
    assert ld.state.consumed_batches == 1
    ld.close()


def test_a_loader_left_open_is_freed_with_its_reading_thread(source):
    """The reading thread holds no reference to its loader: a loader dropped without close() (a
    test, a failed run's trainer) is freed, its read-ahead batches with it, and the thread ends."""
    import gc
    import threading
    import time
    import weakref

    before = {t for t in threading.enumerate() if t.name.startswith("batch-reader")}
    ld = loader(source, 8)
    ld.next_microbatches()
    ld._ahead[1].result()
    gone = weakref.ref(ld)
    del ld
    gc.collect()
    assert gone() is None
    deadline = time.time() + 10
    while {t for t in threading.enumerate() if t.name.startswith("batch-reader")} - before and time.time() < deadline:
        time.sleep(0.05)
    assert not {t for t in threading.enumerate() if t.name.startswith("batch-reader")} - before


def test_without_prefetch_a_batch_is_read_in_the_calling_thread(source):
    watched = WatchedSource(source)
    ld = loader(watched, 8)
    ld.next_microbatches(prefetch=False)
    assert watched.reads and all(t == threading_main() for t, _ in watched.reads) and ld._reader is None


def threading_main() -> str:
    import threading

    return threading.main_thread().name


class Counted:
    """A source of `n` packed sequences that is only counted (the order needs nothing else)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("shuffle", [True, False])
def test_an_epochs_order_is_generators_permutation_in_int32_without_an_int64_copy(shuffle):
    """The order every earlier run trained on (so a resume continues it), held in int32, and built
    without the int64 array permutation(n) returns (1.6 GB at ~2*10^8 sequences)."""
    import tracemalloc

    n = 1_000_003
    ld = GlobalBatchLoader(Counted(n), 8, 1, 0, 1, seed=5, pad_id=0, shuffle=shuffle)
    tracemalloc.start()
    try:
        order = ld._order(3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    expected = np.random.default_rng([5, 3]).permutation(n) if shuffle else np.arange(n)
    assert order.dtype == np.int32 and np.array_equal(order, expected)
    assert peak < 1.5 * 4 * n, f"{peak / 2**20:.1f} MiB for a {4 * n / 2**20:.1f} MiB order"


def test_per_sequence_counts_are_what_the_collated_sequences_hold():
    """The counts the step normalises its losses by before it runs (last_global) against the batch
    itself: its tokens, groups, pairs, positives with a negative, next-token targets (the mask the
    auxiliary loss sums over) and attention pairs (the mask without padding). Empty prefixes too."""
    import torch

    from engine.packing import collate, dense_mask, next_token_mask
    from tests.engine.test_packing import random_groups as mixed_groups

    groups = mixed_groups(np.random.default_rng(4), 80)
    assert any(len(g.prefix) == 0 for g in groups)
    data = PackedGroups(groups, 40)
    for i in range(len(data)):
        b = collate(data.sequences([i]), 40, 0)
        has_neg = torch.zeros(b.num_groups, dtype=torch.bool).index_fill_(0, b.cand_group[b.labels == 0], True)
        held = {"tokens": b.num_real_tokens, "groups": b.num_groups, "pairs": len(b.pair_pos),
                "positives": int(((b.labels == 1) & has_neg[b.cand_group]).sum()),
                "lm_targets": int(next_token_mask(b.layout).sum()),
                "attention_pairs": int((dense_mask(b.layout) & (b.layout[:, 1] >= 0)[:, :, None]).sum())}
        assert {k: int(v[i]) for k, v in data.per_sequence.items()} == held, f"sequence {i}"


class Numbered:
    """n packed sequences, sequence i one group whose prefix is the token i + 1 (what a batch holds
    reads back as sequence numbers)."""

    def __init__(self, n):
        from engine.group import Group

        self.n, self.seq_length = n, 3
        self.per_sequence = {"tokens": np.full(n, 3, dtype=np.int64)}
        self.group = lambda i: Group.checked(np.array([i + 1], dtype=np.int32),
                                             [np.array([1], dtype=np.int32)] * 2, np.array([1, 0], dtype=np.int8))

    def __len__(self):
        return self.n

    def sequences(self, indices):
        return [[self.group(int(i))] for i in indices]


def served(loaders, steps: int) -> list[int]:
    """The sequences every rank's micro-batches of the next `steps` global batches hold, rank after rank."""
    out = []
    for s in range(steps):
        for ld in loaders:
            for mb in ld.next_microbatches(prefetch=s % 2 == 0):
                assert len(mb.tokens) <= ld.micro_batch
                out += (mb.tokens[:, 0] - 1).tolist()
    return out


def test_every_rank_layout_serves_each_epoch_once_and_resumes_exactly_at_another():
    """For layouts the engine accepts (dp x micro_batch dividing global_batch <= sequences; as few
    sequences as a batch, as data-parallel ranks): the micro-batches of all ranks, step after step,
    lay every epoch's sequences end to end, each once; fresh loaders at another data-parallel size
    and micro-batch, resumed at any step, serve exactly what the uninterrupted ones served next."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        dp, mb = int(rng.choice([1, 2, 3, 4])), int(rng.choice([1, 2, 3]))
        g = dp * mb * int(rng.integers(1, 4))
        n = g + int(rng.integers(0, 3)) * int(rng.integers(0, 7))
        source, steps = Numbered(n), int(rng.integers(1, 3 * n // g + 3))
        ranks = [GlobalBatchLoader(source, g, mb, r, dp, seed=trial, pad_id=0) for r in range(dp)]
        stream = served(ranks, steps)
        assert len(stream) == steps * g
        for e in range(0, len(stream), n):
            window = stream[e:e + n]
            assert len(set(window)) == len(window) and set(window) <= set(range(n)), (trial, e)
        at = int(rng.integers(0, steps + 1))
        layouts = [(d, m) for d in (1, 2, 3, 4) for m in (1, 2, 3) if g % (d * m) == 0]
        dp2, mb2 = layouts[int(rng.integers(0, len(layouts)))]
        saved = GlobalBatchLoader(source, g, 1, 0, 1, seed=trial, pad_id=0)
        saved.load_state_dict({"consumed_batches": at})
        resumed = [GlobalBatchLoader(source, g, mb2, r, dp2, seed=trial, pad_id=0) for r in range(dp2)]
        for ld in resumed:
            ld.load_state_dict(saved.state_dict())
        assert served(resumed, steps - at) == stream[at * g:], (trial, at, dp2, mb2)
        for ld in ranks + resumed:
            ld.close()
