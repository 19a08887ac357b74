"""polar/reward_client.py (RewardClient, AsyncRewardClient and their errors) against small stand-ins for
`polar serve` on loopback (real HTTP, no mocks of the client): chunks and their order, answers that are not one
reward per item, bad items, forks, pickling, event loops and their connection pools (retries, waits for an
overloaded or loading server, timeouts and deadlines: test_reward_client_waits.py)."""
from __future__ import annotations

import asyncio
import json
import pickle
import threading

import pytest

from polar import reward_client
from tests.polar.rewards_server import RewardsServer, at_once, free_port


ITEMS = [{"prompt": "p", "reference": "r", "output": "x" * n} for n in (1, 2, 3, 4, 5)]


def test_rewards_follow_the_answers_indices_in_every_chunk():
    with RewardsServer("reversed") as srv:
        with reward_client.RewardClient(srv.url, chunk_size=2) as client:
            assert client.score(ITEMS) == [1.0, 2.0, 3.0, 4.0, 5.0]

        async def go():
            async with reward_client.AsyncRewardClient(srv.url, chunk_size=2) as client:
                return await client.score(ITEMS)

        assert asyncio.run(go()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    sizes = [len(b["items"]) for b in srv.bodies]
    assert sizes[:3] == [2, 2, 1] and sorted(sizes[3:]) == [1, 2, 2]  # the async chunks arrive in any order


@pytest.mark.parametrize("mode,message", [("short", "1 rewards for 2 items"), ("html", "not JSON"),
                                          ("nan", r"the reward of items\[3\] is nan, not a finite number"),
                                          ("text", r"the reward of items\[3\] is '4.0', not a finite number"),
                                          ("null", r"the reward of items\[3\] is None, not a finite number"),
                                          ("huge", r"the reward of items\[3\] is 1000000000000000000000000000000"
                                                   r"000000000, not a finite number")])
def test_an_answer_that_is_not_one_reward_per_item_is_an_error_not_misaligned_rewards(mode, message):
    """A NaN (Python's json reads it), a string or a null reward was taken (float()) or failed
    naming no item: an RL step averaged a NaN in; an integer past a float's range let a bare
    OverflowError out of math.isfinite. Sent in chunks of 2, item 3 is the second of its request:
    named by its index in the call, and the server by its URL."""
    with RewardsServer(mode) as srv, reward_client.RewardClient(srv.url, chunk_size=2) as client:
        with pytest.raises(reward_client.RewardServerError,
                           match=rf"^reward server at {srv.url}/v1/rewards answered 200: .*{message}"):
            client.score(ITEMS)


@pytest.mark.parametrize("kw,message", [({"chunk_size": 0}, "chunk_size"), ({"max_retries": -1}, "max_retries")])
def test_client_settings_that_could_never_send_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        reward_client.RewardClient("http://127.0.0.1:9", **kw)


def test_chunks_keep_under_the_clients_body_budget_in_order():
    items = [{"prompt": "p", "reference": "r" * 300, "output": "x" * n} for n in range(1, 41)]
    with RewardsServer() as srv, reward_client.RewardClient(srv.url, max_body_bytes=2_000) as client:
        assert client.score(items) == [float(n) for n in range(1, 41)]
    assert len(srv.sizes) > 5 and max(srv.sizes) <= 2_000, srv.sizes
    assert [it["output"] for b in srv.bodies for it in b["items"]] == [it["output"] for it in items]


def test_an_item_that_is_not_text_is_named_before_sending():
    with pytest.raises(ValueError, match="item 1 holds a lone surrogate"):
        reward_client.RewardClient("http://127.0.0.1:9").score([ITEMS[0], {"prompt": "p", "reference": "r",
                                                                    "output": "\ud800"}])
    with pytest.raises(ValueError, match="max_body_bytes must be a positive integer"):
        reward_client.RewardClient("http://127.0.0.1:9", max_body_bytes=0)


def test_a_bad_item_is_named_by_its_index_in_the_call_not_in_its_chunk():
    # the server numbers the items of the request it got: sent in chunks of 2, item 5 was "items[1]"
    items = ITEMS + [{"prompt": "p", "reference": "r", "output": 7}]
    with RewardsServer() as srv:
        with reward_client.RewardClient(srv.url, chunk_size=2) as client:
            with pytest.raises(reward_client.RewardServerError,
                               match=r"answered 400: items\[5\]\.output must be") as err:
                client.score(items)
        # the server named by its URL; Ray (verl's reward functions) pickles a worker's exception to the
        # driver, which failed (TypeError: __init__() missing 'message') and lost the error
        # and kept only the arguments: a note added on the way (add_note) and an attribute set were lost
        err.value.add_note("step 12")
        err.value.step = 12
        e = pickle.loads(pickle.dumps(err.value))
        assert type(e) is reward_client.RewardServerError and str(e) == str(err.value)
        assert (e.status, e.url) == (400, f"{srv.url}/v1/rewards") and str(e).startswith(f"reward server at {e.url} ")
        assert (e.__notes__, e.step, e.message) == (["step 12"], 12, err.value.message)

        async def go():
            async with reward_client.AsyncRewardClient(srv.url, chunk_size=4) as client:
                return await client.score(items)

        with pytest.raises(reward_client.RewardServerError, match=r"answered 400: items\[5\]\.output must be"):
            asyncio.run(go())


@pytest.mark.parametrize("client_class", [reward_client.RewardClient, reward_client.AsyncRewardClient])
def test_an_item_over_the_servers_body_limit_by_itself_is_named(client_class):
    """A chunk over the server's --max-body-bytes is halved down to the item too long alone, whose
    413 ("the body is N bytes ...") named no item: which of a batch of rollouts was too long?"""
    items = ITEMS[:2] + [{"prompt": "p", "reference": "r", "output": "x" * 3000}] + ITEMS[2:]
    with RewardsServer(max_body=2000) as srv:
        with pytest.raises(reward_client.RewardServerError,
                           match=r"answered 413: the body is \d+ bytes, .*\(--max-body-bytes\) \(items\[2\], sent "
                                 r"alone: this item alone is over the limit\)$"):
            _score(client_class, srv.url, items=items)


def _score_in_a_fork(client, items):
    """client.score(items) in a process forked from this one (as a fork-started process pool
    runs verl's reward functions): its rewards, or its error's text."""
    return _in_a_fork(lambda: client.score(items))


def _in_a_fork(fn):
    """fn() in a process forked from this one: what it returned, or its error's text."""
    import multiprocessing

    def child(conn):
        try:
            conn.send(fn())
        except Exception as e:
            conn.send(f"{type(e).__name__}: {e}")

    parent_end, child_end = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(target=child, args=(child_end,))
    proc.start()
    try:
        if not parent_end.poll(60):
            raise AssertionError("the forked process sent nothing in 60 s")
        return parent_end.recv()
    finally:
        proc.join(10)


def test_a_forked_process_does_not_send_down_its_parents_connections():
    """A process forked after the client had sent held the parent's kept-alive socket: parent and
    children sent down one TCP connection, interleaving their bodies (polar serve answered 400 to
    garbled JSON, calls hung) and reading each other's answers. Each process now has its own."""
    with RewardsServer(keep_alive=True) as srv, reward_client.RewardClient(srv.url) as client:
        assert client.score(ITEMS[:1]) == [1.0]
        assert _score_in_a_fork(client, ITEMS[1:3]) == [2.0, 3.0]
        assert client.score(ITEMS[3:]) == [4.0, 5.0]
    parent, child, parent_again = srv.ports
    assert parent_again == parent, "the parent's connection was not kept alive: the test shows nothing"
    assert child != parent


def test_an_async_client_serves_one_event_loop_after_another():
    """A reward function that runs each step's calls under asyncio.run holds one client across
    loops: the connection the first loop kept alive belonged to it, and the second call failed at
    once with a bare 'RuntimeError: Event loop is closed'."""
    async def twice(client):
        return [await client.score(ITEMS[:2]), await client.score(ITEMS[2:])]

    with RewardsServer(keep_alive=True) as srv:
        client = reward_client.AsyncRewardClient(srv.url)
        for _ in range(2):
            assert asyncio.run(twice(client)) == [[1.0, 2.0], [3.0, 4.0, 5.0]]
        asyncio.run(client.aclose())
    assert srv.ports[0] == srv.ports[1], "no connection was kept alive: the test shows nothing"


def _score(client_class, url: str, items=ITEMS, **kw) -> list[float]:
    if client_class is reward_client.RewardClient:
        with reward_client.RewardClient(url, **kw) as client:
            return client.score(items)

    async def go():
        async with reward_client.AsyncRewardClient(url, **kw) as client:
            return await client.score(items)

    return asyncio.run(go())


def test_threads_of_a_forked_process_share_its_one_new_connection_pool():
    """A forked process makes an httpx client of its own (2803df7); its threads' first calls made
    one each, all but one dropped unclosed. The parent's is untouched."""
    client = reward_client.RewardClient(f"http://127.0.0.1:{free_port()}")
    parents = client._connections()

    def made():
        made = at_once(client._connections)
        return len({id(h) for h in made}), any(h is parents for h in made)

    try:
        assert _in_a_fork(made) == (1, False)
    finally:
        client.close()
    assert client._connections() is parents


_UNPICKLE_AND_SCORE = """
import asyncio, json, pickle, sys
client = pickle.load(sys.stdin.buffer)
items = [{"prompt": "p", "reference": "r", "output": "xyz"}]
got = client.score(items) if hasattr(client, "close") else asyncio.run(client.score(items))
print(json.dumps(got))
"""


@pytest.mark.parametrize("client_class", [reward_client.RewardClient, reward_client.AsyncRewardClient])
def test_a_client_is_pickled_into_another_process(client_class):
    """Ray pickles a reward function by value with what it refers to (verl loads the custom reward
    file by its path, so cloudpickle cannot name its module), and a 'spawn' or 'forkserver' process
    pool pickles its arguments: a RewardClient failed to pickle (TypeError: cannot pickle
    '_thread.RLock' object, its httpx client's). The copy keeps its settings and makes its own
    connections in the process that unpickles it; the original keeps its own."""
    import subprocess
    import sys

    with RewardsServer(keep_alive=True) as srv:
        client = client_class(srv.url, chunk_size=3, max_retries=2, deadline_s=60)
        assert _score_with(client, ITEMS[:1]) == [1.0]  # used first: a kept-alive connection open
        copy = pickle.loads(pickle.dumps(client))
        assert (copy.base_url, copy.chunk_size, copy.max_retries, copy.deadline_s) == (srv.url, 3, 2, 60)
        done = subprocess.run([sys.executable, "-c", _UNPICKLE_AND_SCORE], input=pickle.dumps(client),
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads(done.stdout) == [3.0]
        assert _score_with(client, ITEMS[1:2]) == [2.0]
        _score_with(copy, ITEMS[:1])
        _close(client), _close(copy)
        _close(pickle.loads(pickle.dumps(client)))  # a copy never used holds nothing of its own to close
    original, other_process, original_again, copy = srv.ports
    assert other_process != original and copy != original
    if client_class is reward_client.RewardClient:  # asyncio.run's loop took the async client's connection with it
        assert original_again == original, "the original's connection was not kept: the test shows less"


def _score_with(client, items):
    return client.score(items) if isinstance(client, reward_client.RewardClient) else asyncio.run(client.score(items))


def _close(client):
    return client.close() if isinstance(client, reward_client.RewardClient) else asyncio.run(client.aclose())


def test_closing_an_async_client_makes_nothing_to_close():
    """aclose() took this loop's httpx client through the getter that makes one where the loop had none, so
    closing a client never used from this loop (or a copy unpickled in this process) made a connection pool
    to close it. Nothing is made now; a loop's pool that did send is closed."""
    with RewardsServer() as srv:
        client = reward_client.AsyncRewardClient(srv.url)

        async def closed_and_made():
            await client.aclose()
            return asyncio.get_running_loop() in client._http

        assert not asyncio.run(closed_and_made())  # never used

        async def score_then_close():
            await client.score(ITEMS[:1])
            http = client._http[asyncio.get_running_loop()]
            await client.aclose()
            return http.is_closed

        assert asyncio.run(score_then_close())
        assert not asyncio.run(closed_and_made())  # used from another loop, not from this one
        copy = pickle.loads(pickle.dumps(client))
        asyncio.run(copy.aclose())
        assert copy._http is None


class _LoopThread:
    """An event loop running in a thread of its own, as a trainer's or an actor's runs on."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def test_an_async_client_keeps_one_pool_per_live_event_loop():
    """A client called from two event loops that both live on (each thread of a reward worker with
    its own loop) made a new httpx client at every switch of loop (2224874), dropping the last one
    with its kept-alive connection unclosed: one new connection per call, the dropped ones left open
    until garbage collected ('unclosed transport'). Each loop now keeps its own."""
    with RewardsServer(keep_alive=True) as srv:
        client = reward_client.AsyncRewardClient(srv.url)
        loops = [_LoopThread(), _LoopThread()]
        try:
            for i in range(6):
                assert loops[i % 2].run(client.score(ITEMS[:1])) == [1.0]
            for lt in loops:
                lt.run(client.aclose())
        finally:
            for lt in loops:
                lt.close()
    assert len(set(srv.ports)) == 2, f"{len(set(srv.ports))} connections for 6 calls from 2 loops"
