"""`python -m polar.serve` as a process: start-up errors, bearer auth from --api-key-env, graceful
shutdown on SIGTERM finishing the request in flight, and model parallelism (torchrun over gloo: TP2,
or two pipeline stages) giving the rewards of one process."""
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from polar.serve.items import StructuredItem, format_structured

from .conftest import ROOT
from .items_gen import make_items


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env_extra or {}))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_healthy(proc, url, limit_s=300):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("the server did not become healthy")


def _rank_zero(launcher_pid: int) -> int:
    """The worker of RANK=0 among the launcher's children (read from /proc)."""
    kids = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
    for pid in kids:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if b"RANK=0" in env:
            return int(pid)
    raise AssertionError(f"no RANK=0 worker among {kids}")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "polar.serve", "--checkpoint", str(tmp_path / "nope")], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no such directory" in r.stderr


@pytest.fixture(scope="module")
def texts_and_expected(tokenizer, alone):
    items = make_items(31, groups=2, rollouts=3)
    formatted = format_structured(tokenizer, [StructuredItem(**it) for it in items], 16384, 4096)
    return [t for t, _ in formatted], alone([i for _, i in formatted])


def test_auth_and_graceful_shutdown(checkpoint_dir, texts_and_expected):
    texts, expected = texts_and_expected
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start([sys.executable, "-m", "polar.serve", "--checkpoint", checkpoint_dir, "--port", str(port),
                   "--max-wait-ms", "5000", "--api-key-env", "POLAR_TEST_KEY"], {"POLAR_TEST_KEY": "k3y"})
    try:
        _wait_healthy(proc, url)
        assert httpx.post(f"{url}/classify", json={"text": texts}, timeout=120).status_code == 401
        answer = {}

        def in_flight():
            answer["r"] = httpx.post(f"{url}/classify", json={"model": "m", "text": texts},
                                     headers={"Authorization": "Bearer k3y"}, timeout=120)

        t = threading.Thread(target=in_flight)
        t.start()
        # SIGTERM while the request waits in the batcher's queue (--max-wait-ms 5000; closing ends the wait)
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health").json()["queue_items"] == 0:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert answer["r"].status_code == 200
        np.testing.assert_allclose([e["embedding"][0] for e in answer["r"].json()], expected, rtol=0, atol=1e-5)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_two_model_parallel_ranks_equal_one_process(checkpoint_dir, texts_and_expected, layout):
    texts, expected = texts_and_expected
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "polar.serve", "--checkpoint", checkpoint_dir, "--port", str(port), *layout])
    try:
        _wait_healthy(proc, url, limit_s=400)
        for path, read in (("/classify", lambda a: [e["embedding"][0] for e in a]),
                           ("/pooling", lambda a: [e["data"][-1][0] for e in a["data"]])):
            body = {"text": texts} if path == "/classify" else {"input": texts}
            got = read(httpx.post(f"{url}{path}", json=body, timeout=120).json())
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        # Stop rank 0 as a process manager would stop the server (torchrun itself treats a signal
        # as a failure): it stops the other rank, both leave the process group, torchrun exits 0.
        os.kill(_rank_zero(proc.pid), signal.SIGTERM)
        assert proc.wait(120) == 0, proc.stdout.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tp2_with_dynamic_rope_refuses_long_items_and_keeps_serving(dynamic_checkpoint_dir, tokenizer, alone_dynamic):
    """The model's positions checked before rank 0 broadcasts: a refusal on every rank used to end
    the other rank's loop, and the next request hung on its broadcast."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "polar.serve", "--checkpoint", dynamic_checkpoint_dir, "--port", str(port), "--tp", "2",
                   "--pack-rows", "on", "--row-tokens", "1024"])
    try:
        _wait_healthy(proc, url, limit_s=400)
        texts = [f"prompt number {i} and some words\nref<|reward|>prompt number {i}\nout[UNUSED_TOKEN_130]"
                 for i in range(12)]
        expected = alone_dynamic(tokenizer.encode_served_batch(texts))
        for _ in range(2):
            res = httpx.post(f"{url}/classify", json={"text": texts}, timeout=120)
            assert res.status_code == 200, res.text
            np.testing.assert_allclose([e["embedding"][0] for e in res.json()], expected, rtol=0, atol=1e-5)
            big = httpx.post(f"{url}/classify", json={"text": ["x" * 300 + "[UNUSED_TOKEN_130]"]}, timeout=120)
            assert big.status_code == 413 and "max_position_embeddings" in big.text
        os.kill(_rank_zero(proc.pid), signal.SIGTERM)
        assert proc.wait(120) == 0, proc.stdout.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
