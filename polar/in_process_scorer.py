"""POLAR rewards from the model in this process, beside the trainer: `polar serve`'s batching and
shared prefixes without HTTP, taking and refusing exactly what the HTTP clients of polar/reward_client.py do
(polar/reward.py's RL hooks take one as scorer=).

    from polar.in_process_scorer import InProcessScorer
    scorer = InProcessScorer.load("runs/ft/checkpoints")
    scorer.score([{"prompt": ..., "reference": ..., "output": ...}])
    await scorer.score_async([...])       # from an event loop: no thread held while the batch is scored

In a trainer's distributed workers (torch.distributed already started, N ranks): call load on every
rank of the process group, each rank then holds its own replica (tp=pp=1) and scores its own items,
data parallel. The load is collective over the whole group (engine/inference.py): one that not every
rank joins within join_timeout_s (rank 0 alone, say) is refused on the ranks that came, as is a process
whose megatron state (a megatron trainer's) has another tp/pp than 1/1; for those, score through
`polar serve` (processes of its own) with polar/reward_client.py's clients. The trainer's random
states are left as they were.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Optional, Sequence


def _structured_items(items: Sequence[dict]) -> list:
    """Items checked as `polar serve` checks /v1/rewards entries (a null wrapper is sft; a missing or
    mistyped field, a lone surrogate, an empty reference, is a ValueError naming the item), so
    in-process scoring takes and refuses exactly what the HTTP clients do."""
    from polar.serve import validation
    from polar.serve.items import StructuredItem

    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise TypeError(f"item {i} must be a dict with prompt, reference and output, got {type(it).__name__}")
        where = f"item {i}"
        try:
            for key in ("prompt", "reference", "output"):
                if key not in it:
                    raise validation.RequestError(f"{where}: missing field {key!r}")
            prompt = validation.text_field(it["prompt"], f"{where}.prompt")
            reference = validation.text_field(it["reference"], f"{where}.reference")
            validation.check_reference(reference, f"{where}.reference")
            out.append(StructuredItem(prompt, reference,
                                      validation.text_field(it["output"], f"{where}.output"),
                                      validation.wrapper_field(it.get("wrapper"), f"{where}.wrapper")))
        except validation.RequestError as e:
            raise ValueError(e.message) from None
    return out


class InProcessScorer:
    """The reward model in this process, with the server's batching and shared prefixes: calls
    from several threads and event loops are batched together, and a call that finds the queue full
    (max_queue_items) waits for room, as the HTTP clients retry a 429; waiting calls are let in
    first come, first served (a large call is not passed by small ones from other threads that
    fit in the room freed meanwhile; each waits behind the calls that came before it; score_async's
    from the time a thread of its loop's pool takes up its wait). `score(items)` -> floats;
    `await score_async(items)` the same on an event loop, no thread held while the batch is scored;
    `score_texts(texts)` for strings already in POLAR's serving format. `cuts`: what POLAR's truncation cut in the items
    formatted so far (polar.client_format.Cuts), as `polar serve` exports it on /metrics.
    max_length/max_response: POLAR's truncation, as `polar serve --max-length/--max-response`;
    not given, the client's 16384/4096, or for a scorer whose model has fewer positions
    (`scorer.max_positions`) the largest that fit them, said in `lengths_note`; a given max_length
    whose items may pass the positions is a ValueError naming the largest that fits."""

    def __init__(self, scorer, tokenizer, *, max_length: Optional[int] = None, max_response: Optional[int] = None,
                 **batcher_kw):
        from polar.checkpoint_tokenizer import check_vocabulary
        from polar.client_format import CLIENT_MAX_LENGTH, Cuts
        from polar.client_limits import fitting_response, settle_lengths
        from polar.serve.batcher import Batcher
        from polar.serve.items import check_truncation

        model = getattr(scorer, "model_config", None)
        if model is not None:  # as `polar serve` refuses it at start-up (the trainer's CUDA context at stake here)
            check_vocabulary(tokenizer, model.vocab_size, "not the tokenizer the model was trained with")
        positions = getattr(scorer, "max_positions", None)
        self.lengths_note = None
        if positions:
            max_length, max_response, self.lengths_note = settle_lengths(max_length, max_response, tokenizer,
                                                                         positions, ("max_length", "max_response"))
        else:
            max_length = CLIENT_MAX_LENGTH if max_length is None else max_length
            max_response = fitting_response(max_length) if max_response is None else max_response
            check_truncation(max_length, max_response)
        self.cuts, self._cuts_lock = Cuts(), threading.Lock()
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_response = max_response
        batcher_kw.setdefault("pack_rows", getattr(scorer, "attention_backend", "torch") == "triton")
        batcher_kw.setdefault("max_positions", getattr(scorer, "max_positions", None))
        self.batcher = Batcher(scorer.score, tokenizer.pad_id, **batcher_kw).start()

    @classmethod
    def load(cls, checkpoint: str, tokenizer: Optional[str] = None, *, join_timeout_s: Optional[float] = None,
             **kw) -> "InProcessScorer":
        """join_timeout_s: in a running process group, how long the first rank waits for the others to
        call load too (engine.inference.JOIN_TIMEOUT_S when not given; module docstring)."""
        from engine.inference import JOIN_TIMEOUT_S, ProcessGroupRefusal, RewardScorer
        from polar.checkpoint_tokenizer import choose
        from polar.tokenizer import load_tokenizer

        try:
            scorer = RewardScorer.load(checkpoint, join_timeout_s=JOIN_TIMEOUT_S if join_timeout_s is None
                                       else join_timeout_s)
        except ProcessGroupRefusal as e:
            raise ProcessGroupRefusal(f"InProcessScorer.load: {e}; `polar serve` runs in processes of its own "
                                      "(score through polar.reward_client)") from None
        return cls(scorer, load_tokenizer(choose(tokenizer, str(scorer.info.step_dir), "tokenizer")), **kw)

    def score(self, items: Sequence[dict]) -> list[float]:
        ids = self._item_ids(items)
        return self._finite(self.batcher.score_sync(ids)) if ids else []

    async def score_async(self, items: Sequence[dict]) -> list[float]:
        """score(items) awaited on the caller's running event loop (any loop, any thread's): the batch
        is awaited without holding a thread, so all of a loop's calls in flight at once are batched
        together (polar.reward.compute_score_async), as `polar serve` batches its requests."""
        # The checks and POLAR's formatting and tokenizing are CPU work of the length of the texts:
        # run, as `polar serve` runs them (polar/serve/app.py, item_ids), in a thread of the loop's
        # pool, which the call holds for that only, so a long item does not stall the loop's
        # other coroutines meanwhile.
        ids = await asyncio.to_thread(self._item_ids, items)
        if not ids:
            return []
        return self._finite(await asyncio.wrap_future(await self._submitted(ids)))

    async def _submitted(self, ids: list):
        """The Batcher's future for ids, queued as score_sync queues them (a full queue is waited on)."""
        from polar.serve.batcher import QueueFull

        try:
            return self.batcher.submit(ids)  # room now, and no caller ahead in line
        except QueueFull:
            pass
        # The Batcher's wait for room is a threading.Condition's: only while the queue is full does a
        # call hold a thread, the batches being as large as the queue lets them then.
        waiting = asyncio.get_running_loop().run_in_executor(None, self.batcher.submit, ids, None)
        try:
            return await asyncio.shield(waiting)
        except asyncio.CancelledError:
            # the caller gave up while waiting for room: its items leave the queue once they are in it
            waiting.add_done_callback(lambda w: w.cancelled() or w.exception() or w.result().cancel())
            raise

    def _item_ids(self, items: Sequence[dict]) -> list:
        """The ids of items' serving strings; what the truncation cut is added to self.cuts."""
        from polar.client_format import Cuts
        from polar.serve.items import format_structured

        structured = _structured_items(items)
        if not structured:
            return []
        cuts = Cuts()  # this call's, added under the lock: calls come from several threads
        ids = [i for _, i in format_structured(self.tokenizer, structured, self.max_length, self.max_response, cuts)]
        with self._cuts_lock:
            self.cuts.add(cuts)
        return ids

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Texts checked as `polar serve`'s /classify checks them: one string is one text (a list
        of its characters otherwise), and a non-string, a lone surrogate or a text that does not end
        with the reward token names the text."""
        from polar.format import lone_surrogate
        from polar.serve.items import tokenize_served_text

        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} must be a string, got {type(t).__name__}")
            found = lone_surrogate(t)
            if found:
                raise ValueError(f"text {i} holds a lone surrogate ({found}), which is not text")
        if not texts:
            return []
        ids = tokenize_served_text(self.tokenizer, texts, [f"text {i}" for i in range(len(texts))])  # ValueError
        return self._finite(self.batcher.score_sync(ids), "text")

    @staticmethod
    def _finite(rewards, what: str = "item") -> list[float]:
        """As `polar serve` answers them: NaN or inf is refused, naming the items, never returned."""
        from polar.serve.batcher import non_finite

        bad = non_finite(rewards, [f"{what} {i}" for i in range(len(rewards))])
        if bad:
            raise ValueError(bad)
        return [float(x) for x in rewards]

    def close(self) -> None:
        self.batcher.close()
