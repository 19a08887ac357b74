"""`python -m polar.serve` as a process: start-up errors (settings named by their flags), bearer auth
from --api-key-env, graceful shutdown on SIGTERM finishing the request in flight (with TP2: SIGTERM to
the launcher, to every rank or to a follower alone, which hands it to rank 0), and model parallelism
(torchrun over gloo or a bare srun launch: TP2, or two pipeline stages) giving the rewards of one process."""
import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from polar.serve.items import StructuredItem, format_structured

from .conftest import ROOT
from .gated_serve import LOADED
from .items_gen import make_items


def _free_port():
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


TAKEN = "address already in use"


def _serve(make_cmd, limit_s=300, env_extra=None):
    """(proc, url) of a server that became healthy. make_cmd(port, attempt) -> its command. The port
    is free when chosen but can be taken before the server binds it (other tests run beside these, and
    torchrun's own store picks ports): the server then says so and exits 2, which is retried on
    another port, twice at most; any other failure is raised. A torchrun command must let rank 0's
    stderr reach the console (no --redirects of it; --tee keeps the log files)."""
    for attempt in range(3):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _start(make_cmd(port, attempt), env_extra)
        try:
            _wait_healthy(proc, url, limit_s)
            return proc, url
        except AssertionError as e:
            if TAKEN not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _held_port():
    """A port on loopback that a real server holds (listening, as another server would), and its number."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _workers(launcher_pid: int) -> dict[int, int]:
    """{RANK: pid} of the launcher's worker processes (read from /proc)."""
    kids = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
    ranks = {}
    for pid in kids:
        for var in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
            if var.startswith(b"RANK="):
                ranks[int(var[5:])] = int(pid)
    return ranks


def _rank_zero(launcher_pid: int) -> int:
    ranks = _workers(launcher_pid)
    assert 0 in ranks, f"no RANK=0 worker among {ranks}"
    return ranks[0]


def _classify_in_flight(url, texts, answer, headers=None):
    """POST /classify in a thread; returns once the request waits in the batcher's queue."""
    def post():
        answer["r"] = httpx.post(f"{url}/classify", json={"model": "m", "text": texts}, headers=headers, timeout=120)

    t = threading.Thread(target=post)
    t.start()
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health").json()["queue_items"] == 0:
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.01)
    return t


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    """In this process (`python -m polar.serve` exits with main's value): the refusal comes before any
    model or process group."""
    from polar.serve.server import main

    assert main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_api_key_env_and_a_too_large_tokenizer_are_refused_before_the_weights_load(checkpoint_dir, tmp_path,
                                                                                  capsys, monkeypatch):
    """Both were refused only once the weights had loaded (minutes for a 7B model; under torchrun with
    TP the followers' load too), a typo in the variable's name costing that wait. Here the checkpoint's
    weights are garbage and its model settings say a vocabulary of 64 (the byte tokenizer has 260 ids):
    each refusal is said once, exit 2, and the weights are never read."""
    import shutil

    from polar.serve.server import main

    run = tmp_path / "run"
    shutil.copytree(checkpoint_dir, run)
    (shard,) = run.glob("checkpoints/step_*/*.distcp")
    shard.write_bytes(b"not a checkpoint shard")
    config = run / "config.yaml"
    assert config.read_text().count("vocab_size: 260\n") == 1
    config.write_text(config.read_text().replace("vocab_size: 260\n", "vocab_size: 64\n"))
    for var in ("POLAR_TEST_UNSET", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    refusals = {"--api-key-env POLAR_TEST_UNSET: that environment variable is not set or empty":
                ["--api-key-env", "POLAR_TEST_UNSET"],
                "the tokenizer has 260 ids, the model's vocabulary only 64: wrong --tokenizer?": []}
    for says, flags in refusals.items():
        assert main(["--checkpoint", str(run), "--port", "0", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count(says) == 1 and err.count("polar serve:") == 1, err


@pytest.mark.parametrize("flags, world, says", [
    (["--attention-backend", "triton"], 1, "--attention-backend triton needs a CUDA GPU"),
    (["--tp", "3"], 3, "--tp 3 does not divide model.num_attention_heads=4"),
    (["--pp", "3"], 3, "model.num_layers=2 is not divisible by --pp 3"),
], ids=["attention_backend", "tp", "pp"])
def test_a_refused_setting_is_named_by_its_flag(checkpoint_dir, flags, world, says, monkeypatch, capsys):
    """The engine names the settings it refuses by their config keys (train.attention_backend=triton,
    parallel.tp=3), which a `polar serve` user never wrote. WORLD_SIZE alone stands in for torchrun:
    the layout is refused before any process group starts, so main runs in this process (as
    `python -m polar.serve` runs it, exiting with its value)."""
    if flags[0] == "--attention-backend":
        import torch

        if torch.cuda.is_available():
            pytest.skip("triton attention runs on this machine's GPU")
    from engine.cuda_env import VARIABLE
    from polar.serve.server import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    # main sets VARIABLE for --tp > 1 on a GPU that needs it (engine/cuda_env.py): as it was afterwards
    monkeypatch.setenv(VARIABLE, "")
    monkeypatch.delenv(VARIABLE)
    rc, err = main(["--checkpoint", checkpoint_dir, *flags]), capsys.readouterr().err
    assert rc == 2 and says in err, err[-3000:]
    assert "train." not in err and "parallel." not in err, err[-3000:]


@pytest.fixture(scope="module")
def texts_and_expected(tokenizer, alone):
    items = make_items(31, groups=2, rollouts=3)
    formatted = format_structured(tokenizer, [StructuredItem(**it) for it in items], 16384, 4096)
    return [t for t, _ in formatted], alone([i for _, i in formatted])


def test_a_signal_before_the_server_exists_stops_it_once_started():
    """Rank 0 builds its service (tokenizer, batcher) before uvicorn takes the signals over: a SIGTERM
    then, from the operator or forwarded by a follower, used to be swallowed and the server served on."""
    from types import SimpleNamespace

    from polar.serve.server import _StopRequest

    early, server = _StopRequest(), SimpleNamespace(should_exit=False)
    early(signal.SIGTERM, None)
    early.attach(server)
    assert server.should_exit
    late, server = _StopRequest(), SimpleNamespace(should_exit=False)
    late.attach(server)
    assert not server.should_exit
    late(signal.SIGTERM, None)
    assert server.should_exit


def test_two_pipeline_stages_equal_one_process(checkpoint_dir, texts_and_expected):
    """--pp 2 answers /classify and /pooling with the rewards of one process and stops on rank 0's
    SIGTERM. TP2 is checked on every server of the TP2 tests below: /classify in
    test_tp2_stops_cleanly_on_sigterm_to_every_rank, where the follower's case stops on rank 0's
    SIGTERM (the one the follower hands it), /pooling in
    test_srun_ranks_serve_tp2_refuse_long_items_and_stop_on_sigterm_to_both."""
    texts, expected = texts_and_expected
    proc, url = _serve(lambda port, _: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2", "-m", "polar.serve", "--checkpoint", checkpoint_dir,
                                        "--port", str(port), "--pp", "2"], limit_s=400)
    try:
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


@pytest.mark.parametrize("target", ["launcher", "follower"])
def test_tp2_stops_cleanly_on_sigterm_to_every_rank(checkpoint_dir, texts_and_expected, tmp_path, target):
    """torchrun (on its own SIGTERM) and SLURM signal every rank at once. The follower used to die of
    it while rank 0 still needed it for the request in flight and for its stop broadcast: tracebacks
    ("Application shutdown failed", "Connection closed by peer") and a failed exit. A follower
    signalled alone hands the signal to rank 0. Each rank's output goes to its own log (--redirects)
    so the launcher's own SignalException traceback (launcher case) is not counted against them. The
    launcher forwards its SIGTERM to every rank at once, as SLURM signals them: that case is both.
    --tee rather than --redirects: rank 0 saying its port was taken must reach _serve."""
    texts, expected = texts_and_expected
    where = {}

    def cmd(port, attempt):
        where["logs"] = tmp_path / f"logs{attempt}"  # a retried start writes logs of its own
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--tee",
                "3", "--log-dir", str(where["logs"]), "-m", "polar.serve", "--checkpoint", checkpoint_dir, "--port",
                str(port), "--tp", "2", "--max-wait-ms", "5000"]

    proc, url = _serve(cmd, limit_s=400)
    logs = where["logs"]
    try:
        answer = {}
        t = _classify_in_flight(url, texts, answer)
        ranks = _workers(proc.pid)
        if target == "launcher":
            proc.send_signal(signal.SIGTERM)
        else:
            os.kill(ranks[1], signal.SIGTERM)
        t.join(120)
        rc = proc.wait(120)
        launcher_output = proc.stdout.read()
        assert answer["r"].status_code == 200, answer["r"].text
        np.testing.assert_allclose([e["embedding"][0] for e in answer["r"].json()], expected, rtol=0, atol=1e-5)
        for rank in (0, 1):
            (log,) = logs.glob(f"*/attempt_0/{rank}/stderr.log")
            err = log.read_text()
            assert "Traceback" not in err and "ERROR" not in err, f"rank {rank}:\n{err[-3000:]}"
        if target == "launcher":  # its exit is its own SignalException; the ranks must not need its SIGKILL
            assert "forcefully exiting" not in launcher_output, launcher_output[-3000:]
        else:
            assert rc == 0, launcher_output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tp2_start_up_error_on_rank_zero_stops_the_follower_cleanly(checkpoint_dir, tmp_path):
    """Rank 0 failing after the model load (here: its port, bound before the load, taken by another
    server that bound it too and listened first, which rank 0 learns only as it listens) used to leave
    without the runtime's closing barrier, where the follower then failed with a traceback. Both ranks
    are held after their load (gated_serve: until the launcher's stdin closes) while the other server
    starts listening."""
    logs = tmp_path / "logs"
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as polar serve binds: both may bind
        other.bind(("127.0.0.1", 0))
        port = other.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "--redirects", "3", "--log-dir", str(logs), "-m", "tests.polar.serve.gated_serve",
                                 "--checkpoint", checkpoint_dir, "--port", str(port), "--tp", "2"], cwd=ROOT,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 300
            while not any(LOADED in f.read_text() for f in logs.glob("*/attempt_0/0/stdout.log")):
                assert proc.poll() is None and time.monotonic() < deadline, "rank 0 did not load the model"
                time.sleep(0.1)
            other.listen()
            launcher_output = proc.communicate(timeout=300)[0]  # closes stdin: the ranks go on
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode != 0, launcher_output[-3000:]
    (leader,) = logs.glob("*/attempt_0/0/stderr.log")
    assert f"polar serve: --port {port}: {TAKEN}" in leader.read_text(), leader.read_text()[-3000:]
    (follower,) = logs.glob("*/attempt_0/1/stderr.log")
    assert "Traceback" not in follower.read_text(), follower.read_text()[-3000:]


def _gated(*args):
    return [sys.executable, "-m", "tests.polar.serve.gated_serve", *args]


@pytest.fixture(scope="module")
def unbound(checkpoint_dir, tmp_path_factory):
    """gated_serve's server on a taken port, then on an address not this machine's, one after the other
    in one process (tests/engine/entry_runs.py; each refusal comes before any model or process group,
    the gate held on stdin at /dev/null otherwise): ({case: CompletedProcess}, the taken port)."""
    from tests.engine import entry_runs

    tmp = tmp_path_factory.mktemp("unbound")
    with _held_port() as port:
        runs = [entry_runs.run(taken, "polar.serve.server", "--checkpoint", checkpoint_dir, *where, cwd=ROOT,
                               patch=["tests.polar.serve.gated_serve:gated"])
                for taken, where in (("port", ["--port", str(port)]), ("host", ["--host", "192.0.2.1", "--port", "0"]))]
        return entry_runs.launch(tmp, runs, "unbound", timeout=300), port


@pytest.mark.parametrize("taken", ["port", "host"])
def test_an_address_that_cannot_be_bound_is_refused_before_the_model_loads(unbound, taken):
    """The port was bound by uvicorn after the model load (minutes for a 7B model) and after the
    'on http://' line: a taken port ended in uvicorn's 'ERROR: [Errno 98] ...' and exit 3. The
    port here is held by a real listening socket; 192.0.2.1 (TEST-NET-1) is no address of this machine."""
    done, port = unbound
    r = done[taken]
    out = r.stdout + r.stderr
    says = (f"polar serve: --port {port}: {TAKEN}" if taken == "port"
            else "polar serve: --host 192.0.2.1: cannot assign requested address")
    assert r.returncode == 2 and says in r.stderr, out[-3000:]
    assert LOADED not in out and "on http://" not in out and "ERROR" not in out, out[-3000:]


def test_the_port_opens_once_the_model_has_loaded_then_auth_and_graceful_shutdown(checkpoint_dir,
                                                                                  texts_and_expected):
    """Bound before the model load (so a taken port fails at once), but refusing connections until
    the service is built: a Kubernetes startupProbe or a load balancer reads an open port as a
    server that answers. The server is held after its real model load (gated_serve) while the test
    looks: its port cannot be bound by another process, a connection is refused, and it has not
    said it serves. Released, the same server refuses a request without --api-key-env's bearer key
    and, sent SIGTERM while a request waits in the batcher's queue (--max-wait-ms 5000; closing ends
    the wait), answers it with one process's rewards and exits 0. Started with an open files limit
    of 512 (hard 1024), it raised it to 1024 and said so, and warned that 1024 is under what
    --max-waiting and --max-queue let it hold (nothing raised it: accept() failed at 512)."""
    texts, expected = texts_and_expected
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, POLAR_TEST_KEY="k3y")
    limited = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
               "(512, 1024)); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]
    for attempt in range(3):  # a port chosen free can be taken by another test before the server binds it
        port = _free_port()
        proc = subprocess.Popen(limited + _gated("--checkpoint", checkpoint_dir, "--port", str(port), "--max-wait-ms",
                                                 "5000", "--api-key-env", "POLAR_TEST_KEY")[1:], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        while not seen or seen[-1] not in ("", LOADED + "\n"):  # "": the server exited
            seen.append(proc.stdout.readline())
        if proc.poll() is None or TAKEN not in "".join(seen) or attempt == 2:
            break
    try:
        assert proc.poll() is None, "".join(seen)[-3000:]
        with socket.socket() as other, pytest.raises(OSError) as bound:
            other.bind(("127.0.0.1", port))
        assert bound.value.errno == errno.EADDRINUSE
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=30).close()
        assert "on http://" not in "".join(seen)
        with open(f"/proc/{proc.pid}/limits") as limits:
            assert [line.split()[3:5] for line in limits if line.startswith("Max open files")] == [["1024", "1024"]]
        proc.stdin.write("\n")
        proc.stdin.flush()
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, url)
        assert httpx.post(f"{url}/classify", json={"text": texts}, timeout=120).status_code == 401
        answer = {}
        t = _classify_in_flight(url, texts, answer, {"Authorization": "Bearer k3y"})
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert answer["r"].status_code == 200
        np.testing.assert_allclose([e["embedding"][0] for e in answer["r"].json()], expected, rtol=0, atol=1e-5)
        assert proc.wait(120) == 0
        out = proc.stdout.read()
        assert f"on {url} (open files limit raised from 512 to 1024)\n" in out, out[-3000:]
        assert "polar serve: warning: the open files limit is 1024 (hard limit 1024), under the 16672 this " in out
        assert "--max-waiting 8192 requests waiting for room, --max-queue 8192 one-item requests" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tp2_rank_zero_unable_to_bind_stops_every_rank_at_start_up(checkpoint_dir, tmp_path):
    """Rank 0 binds before any process group exists; when it cannot, it exits 2 and torchrun stops
    the other rank, still starting, instead of both loading the model first and rank 0 failing in
    uvicorn after saying it served. The refusal is said once, by rank 0."""
    logs = tmp_path / "logs"
    with _held_port() as port:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "--redirects", "3", "--log-dir", str(logs), "-m", "polar.serve", "--checkpoint",
                            checkpoint_dir, "--port", str(port), "--tp", "2"], cwd=ROOT,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT), capture_output=True, text=True,
                           timeout=400)
    (leader,) = logs.glob("*/attempt_0/0/stderr.log")
    (follower,) = logs.glob("*/attempt_0/1/stderr.log")
    everything = r.stdout + r.stderr + "".join(f.read_text() for f in logs.glob("*/attempt_0/*/*.log"))
    assert r.returncode == 1 and "exitcode  : 2 " in r.stderr, everything[-3000:]
    assert f"polar serve: --port {port}: {TAKEN}" in leader.read_text(), everything[-3000:]
    assert everything.count(TAKEN) == 1 and "on http://" not in everything, everything[-3000:]
    assert "Traceback" not in follower.read_text(), follower.read_text()[-3000:]


def _srun_ranks(checkpoint_dir, port, *flags):
    """The two ranks of `srun --ntasks 2 python -m polar.serve --tp 2 FLAGS`: plain processes, each with
    the variables a bare srun launch sets (RANK from SLURM_PROCID and so on), no torchrun above them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, WORLD_SIZE="2", SLURM_NTASKS="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    cmd = [sys.executable, "-m", "polar.serve", "--checkpoint", checkpoint_dir, "--port", str(port), "--tp", "2",
           *flags]
    return [subprocess.Popen(cmd, cwd=ROOT, env=dict(env, RANK=str(r), SLURM_PROCID=str(r), LOCAL_RANK=str(r)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]


def _srun_ended(checkpoint_dir, port, *flags):
    """(ranks, [(stdout, stderr) of each]) of _srun_ranks' launch, once both have exited (killed past 120 s)."""
    ranks = _srun_ranks(checkpoint_dir, port, *flags)
    try:
        return ranks, [p.communicate(timeout=120) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize("refusal", ["port", "api-key-env"])
def test_srun_rank_zero_refusing_at_start_up_stops_the_other_rank(checkpoint_dir, refusal, monkeypatch):
    """Without torchrun nothing stopped the follower when rank 0 exited 2 on its taken port: it waited
    in init_process_group for rank 0's store until the c10d timeout (30 minutes), and the SLURM step
    hung. Rank 0 now says its refusal in that store before leaving, and the follower exits 2 naming it.
    An unset --api-key-env variable, which rank 0 alone reads, is refused the same way before the model
    loads (it was refused after the load, on rank 0, the follower stopping with 0)."""
    monkeypatch.delenv("POLAR_TEST_UNSET", raising=False)  # _srun_ranks launches with os.environ
    with _held_port() as port:
        if refusal == "port":
            ranks, out = _srun_ended(checkpoint_dir, port)
            refused = f"--port {port}: {TAKEN}"
        else:
            ranks, out = _srun_ended(checkpoint_dir, 0, "--api-key-env", "POLAR_TEST_UNSET")
            refused = "--api-key-env POLAR_TEST_UNSET: that environment variable is not set or empty"
    everything = "".join(o + e for o, e in out)
    assert [p.returncode for p in ranks] == [2, 2], everything[-3000:]
    assert f"polar serve: {refused}" in out[0][1], everything[-3000:]
    assert f"polar serve rank 1: rank 0 cannot serve ({refused}" in out[1][1], everything[-3000:]
    assert "Traceback" not in everything and "on http://" not in everything, everything[-3000:]


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_tp2_refusal_every_rank_finds_is_said_once(checkpoint_dir, launcher):
    """A refusal decided by the flags and the checkpoint's files, which every rank reads alike (here a
    --max-length the model's positions cannot hold), was said by every rank: one copy per rank. Rank 0
    says it alone; the others exit with its code a moment later (engine.rank_stop), so torchrun stops
    them once rank 0 has said it and reports rank 0's 2. As a bare srun launches them, the other rank
    also waited for rank 0's store until the timeout when rank 0 had refused and left before it came
    (rank 0 waits for every rank to read it now, bound or not). Whether the other rank said it before
    torchrun stopped it was a race; the srun launch, which nothing stops, says it every time."""
    says = "polar serve: --max-length 100000: an item the client's truncation leaves may take up to 100015 tokens"
    if launcher == "torchrun":
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "polar.serve", "--checkpoint", checkpoint_dir, "--port", "0", "--tp", "2",
                            "--max-length", "100000"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                          PYTHONPATH=ROOT),
                           capture_output=True, text=True, timeout=400)
        everything = r.stdout + r.stderr
        assert r.returncode == 1 and "exitcode  : 2 " in r.stderr, everything[-3000:]
    else:
        ranks, out = _srun_ended(checkpoint_dir, 0, "--max-length", "100000")
        everything = "".join(o + e for o, e in out)
        assert [p.returncode for p in ranks] == [2, 2] and says in out[0][1], everything[-3000:]
    assert everything.count(says) == 1, everything[-3000:]


def test_srun_ranks_serve_tp2_refuse_long_items_and_stop_on_sigterm_to_both(dynamic_checkpoint_dir, tokenizer,
                                                                           alone_dynamic):
    """The same launch with a free port: rank 0's store, opened before the process group to say it
    bound, is the one the process group then uses (a second server on MASTER_PORT would fail). TP2
    answers /pooling and /classify as one process, and SIGTERM to both ranks at once (SLURM's
    scancel) stops both with 0. The model (dynamic RoPE within 256 positions, packed rows) has its
    positions checked before rank 0 broadcasts: a refusal on every rank used to end the other rank's
    loop, and the next request hung on its broadcast."""
    for attempt in range(3):  # a port chosen free can be taken by another test before rank 0 binds it
        port = _free_port()
        ranks = _srun_ranks(dynamic_checkpoint_dir, port, "--pack-rows", "on", "--row-tokens", "1024")
        try:
            _wait_healthy(ranks[0], f"http://127.0.0.1:{port}")
            break
        except AssertionError as e:
            for p in ranks:
                p.kill()
                p.wait()
            if TAKEN not in ranks[0].stderr.read() or attempt == 2:
                raise AssertionError(f"{e}\n{ranks[1].stderr.read()[-3000:]}") from None
    url = f"http://127.0.0.1:{port}"
    try:
        texts = [f"prompt number {i} and some words\nref<|reward|>prompt number {i}\nout[UNUSED_TOKEN_130]"
                 for i in range(12)]
        expected = alone_dynamic(tokenizer.encode_served_batch(texts))
        pooled = httpx.post(f"{url}/pooling", json={"input": texts}, timeout=120).json()
        np.testing.assert_allclose([e["data"][-1][0] for e in pooled["data"]], expected, rtol=0, atol=1e-5)
        for _ in range(2):
            res = httpx.post(f"{url}/classify", json={"text": texts}, timeout=120)
            assert res.status_code == 200, res.text
            np.testing.assert_allclose([e["embedding"][0] for e in res.json()], expected, rtol=0, atol=1e-5)
            big = httpx.post(f"{url}/classify", json={"text": ["x" * 300 + "[UNUSED_TOKEN_130]"]}, timeout=120)
            # the limit: the longest text the client leaves at the --max-length settled for the 256 positions
            assert big.status_code == 413 and "text[0] is 302 tokens long, more than" in big.text and "256" in big.text
        for p in ranks:
            p.send_signal(signal.SIGTERM)
        out = [p.communicate(timeout=120) for p in ranks]
        everything = "".join(o + e for o, e in out)
        assert [p.returncode for p in ranks] == [0, 0] and "Traceback" not in everything, everything[-3000:]
        # the lengths the 256 positions settle are said by rank 0 alone (every rank said them)
        assert everything.count("(not the client's 16384)") == 1, everything[-3000:]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()


def test_help_says_what_pack_rows_auto_does(checkpoint_dir, scorer, capsys):
    """--help said auto packs rows "off with the torch reference", and nothing of blocks, the CPU
    default, with which it is off too."""
    from polar.serve.server import build_service, parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    entry = " ".join(capsys.readouterr().out.split("--pack-rows {auto,on,off}")[-1].split("--max-queue")[0].split())
    assert "auto: on with the triton attention kernel, off otherwise: with blocks, the CPU default" in entry, entry
    assert scorer.attention_backend == "blocks"
    packs = {choice: build_service(parse_args(["--checkpoint", checkpoint_dir, "--pack-rows", choice]),
                                   scorer).batcher.pack_rows for choice in ("auto", "on")}
    assert packs == {"auto": False, "on": True}
