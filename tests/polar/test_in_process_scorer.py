"""polar/in_process_scorer.py, InProcessScorer: its start-up checks (what `polar serve` refuses before
serving, it refuses before scoring), its lengths fitted to the model's positions, and its checks of items and
texts (most with a stub model: the checks come first)."""
import asyncio
import json
import threading

import numpy as np
import pytest

from polar.in_process_scorer import InProcessScorer

SPECIALS = ["<unk>", "<s>", "</s>", "<|reward|>", "[UNUSED_TOKEN_130]"]


def _word_tokenizer(path, words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from polar.tokenizer import HFTokenizer

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "pad_token": "</s>"}))
    return HFTokenizer(path, bos="<s>", pad="</s>")


def test_a_tokenizer_with_more_ids_than_the_model_is_refused(tmp_path):
    """It was taken, and an item holding an id past the model's vocabulary failed its round with
    IndexError('index out of range in self') (on a GPU, a device-side assert in the trainer's own
    CUDA context); `polar serve` refuses such a tokenizer at start-up."""
    from engine.inference import RewardScorer

    scorer = RewardScorer.random(dict(num_layers=1, hidden_size=32, num_attention_heads=2, num_query_groups=1,
                                      ffn_hidden_size=64, vocab_size=64, max_position_embeddings=128),
                                 attention_backend="torch")
    with pytest.raises(ValueError, match="the tokenizer has 105 ids, the model's vocabulary only 64"):
        InProcessScorer(scorer, _word_tokenizer(tmp_path / "big", 100))
    fits = InProcessScorer(scorer, _word_tokenizer(tmp_path / "fits", 50))
    try:
        assert len(fits.score([{"prompt": "w1 w2", "reference": "w3", "output": "w49"}])) == 1
    finally:
        fits.close()


class _StubModel:
    """Reward = the position of the item's last token (its length - 1): enough to see which ids
    were scored."""

    def score(self, batch):
        return batch.layout[:, 0].reshape(-1)[batch.reward_index].numpy().astype(np.float32)


@pytest.fixture
def in_process():
    from polar.tokenizer import ByteTokenizer

    s = InProcessScorer(_StubModel(), ByteTokenizer(), max_length=256, max_response=64, max_wait_s=0.001)
    yield s
    s.close()


class _StubModelOfPositions(_StubModel):
    def __init__(self, positions: int):
        self.max_positions = positions


def test_in_process_scorer_fits_its_lengths_to_the_models_positions():
    """As `polar serve` and `polar score` do (polar.client_limits): the client's default 16384 was
    kept for a model of fewer positions, so items within it but past the positions were formatted and
    then refused one by one; a given max_length that cannot fit is refused at once, naming the largest."""
    from polar.tokenizer import ByteTokenizer

    s = InProcessScorer(_StubModelOfPositions(4096), ByteTokenizer(), max_wait_s=0.001)
    try:
        assert (s.max_length, s.max_response) == (4096 - 15, (4096 - 15 - 6) // 2)
        assert "max_length 4081" in s.lengths_note and "4096 positions" in s.lengths_note
        long = {"prompt": "p" * 9000, "reference": "r" * 5000, "output": "o" * 5000}
        last = s.score([long])[0]  # the position read: the item's length - 1
        assert s.max_length - 8 <= last < s.max_length  # cut to the truncation's length, and scored
    finally:
        s.close()
    with pytest.raises(ValueError, match="max_length 8000: .* the largest max_length whose items fit is 4081"):
        InProcessScorer(_StubModelOfPositions(4096), ByteTokenizer(), max_length=8000)
    # a scorer that knows no positions: a max_length given alone brings the response length that fits it,
    # as on the command line (it was refused: "leaves no prompt budget ... max_response 4096")
    s = InProcessScorer(_StubModel(), ByteTokenizer(), max_length=2000, max_wait_s=0.001)
    assert (s.max_length, s.max_response) == (2000, 997)
    s.close()
    # a model of the client's positions and more keeps the client's lengths, with nothing to say
    s = InProcessScorer(_StubModelOfPositions(32768), ByteTokenizer(), max_wait_s=0.001)
    assert (s.max_length, s.max_response, s.lengths_note) == (16384, 4096, None)
    s.close()


def test_in_process_scorer_reads_a_null_wrapper_as_sft_as_the_server_does(in_process):
    item = {"prompt": "hello", "reference": "world", "output": "earth"}
    sft = in_process.score([{**item, "wrapper": "sft"}])
    assert in_process.score([{**item, "wrapper": None}]) == in_process.score([item]) == sft
    assert in_process.score([{**item, "wrapper": "pretrain"}]) != sft


@pytest.mark.parametrize("item,error,message", [
    ({"prompt": "a", "reference": "b"}, ValueError, "item 0: missing field 'output'"),
    ({"prompt": "a", "reference": "b", "output": 5}, ValueError, "item 0.output must be a string or an array"),
    ({"prompt": "a", "reference": "b", "output": "\ud800"}, ValueError, "item 0.output holds a lone surrogate"),
    ({"prompt": "a", "reference": "", "output": "o"}, ValueError, "item 0.reference: the reference is empty"),
    ({"prompt": "a", "reference": [{"content": " "}], "output": "o"}, ValueError,
     r"item 0.reference: the reference is empty \(only whitespace\)"),
    ("just text", TypeError, "item 0 must be a dict"),
])
def test_in_process_scorer_names_the_bad_item_and_field(in_process, item, error, message):
    with pytest.raises(error, match=message):
        in_process.score([item])
    with pytest.raises(error, match=message):
        asyncio.run(in_process.score_async([item]))


def test_in_process_texts_are_read_as_classify_reads_them(in_process):
    # a bare string was iterated: "abc" gave three rewards, one per character
    text = "<|reward|>abc[UNUSED_TOKEN_130]"
    assert in_process.score_texts(text) == in_process.score_texts([text]) and len(in_process.score_texts(text)) == 1
    assert in_process.score_texts([]) == []
    with pytest.raises(ValueError, match="text 1 holds a lone surrogate"):
        in_process.score_texts([text, "a\ud800"])
    with pytest.raises(TypeError, match="text 1 must be a string, got int"):
        in_process.score_texts([text, 5])


@pytest.mark.parametrize("bad", ["<|reward|>abc[UNUSED_TOKEN_130]\n", "<|reward|>abc", "abc", ""])
def test_in_process_texts_must_end_with_the_reward_token(in_process, bad):
    """The reward is read at a text's last token: one ending after the reward token (a trailing
    newline) or without it was scored at whatever token came last, as /classify scored it."""
    with pytest.raises(ValueError, match=r"^text 1 does not end with the reward token \[UNUSED_TOKEN_130\]"):
        in_process.score_texts(["<|reward|>abc[UNUSED_TOKEN_130]", bad])


def test_score_async_given_up_while_waiting_for_room_is_not_scored():
    """score_async waits for room in a full queue in a thread of the loop's pool; a caller that gives up
    meanwhile (its task cancelled) has its items taken off the queue as soon as that thread queues them,
    as a cancelled request leaves `polar serve`'s queue, instead of their being scored for nobody."""
    from polar.tokenizer import ByteTokenizer

    gates, scored = [threading.Event(), threading.Event()], []

    class Held(_StubModel):  # the k-th forward waits for gates[k]
        def score(self, batch):
            out = super().score(batch)
            scored.append(out.tolist())
            assert gates[len(scored) - 1].wait(30)
            return out

    s = InProcessScorer(Held(), ByteTokenizer(), max_length=256, max_response=64, max_wait_s=0.001,
                        max_queue_items=1)

    async def until(condition):
        for _ in range(3000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("not reached in 30 s")

    def settled():  # under the Batcher's lock: a caller let in leaves the line and joins the queue in one hold
        with s.batcher._cond:
            return not s.batcher.waiting_for_room and not s.batcher.queued_items

    async def calls():
        items = [{"prompt": "p", "reference": "r", "output": "o" * n} for n in (1, 2, 3)]
        first = asyncio.create_task(s.score_async(items[:1]))
        await until(lambda: scored)  # in its forward, held
        second = asyncio.create_task(s.score_async(items[1:2]))
        await until(lambda: s.batcher.queued_items == 1)  # the queue is full
        third = asyncio.create_task(s.score_async(items[2:]))
        await until(lambda: s.batcher.waiting_for_room == 1)
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third
        gates[0].set()  # the second call's round frees the room the third one's thread waited for
        await until(lambda: len(scored) == 2 and settled())
        gates[1].set()
        return await first, await second

    try:
        first, second = asyncio.run(calls())
    finally:
        s.close()  # would score what is still queued
    assert len(scored) == 2 and [first, second] == scored
