"""`polar serve`: a reward server for RL trainers (see polar/serve/app.py for the endpoints).

    polar serve --checkpoint runs/default --port 8000
    torchrun --nproc_per_node 2 -m polar.serve --checkpoint RUN --tp 2     # tensor parallel, rank 0 serves HTTP
    torchrun --nproc_per_node 4 -m polar.serve --checkpoint RUN --tp 2 --pp 2   # and pipeline stages

Requests wait at most --max-wait-ms for others to batch with; items sharing a prefix (n rollouts
of one prompt against one reference, within and across requests) compute it once. SIGTERM or SIGINT
to torchrun or to any rank (a follower hands it to rank 0 on its host) finishes the requests in
flight, then every rank exits 0. Rank 0 reads --api-key-env's variable and binds --host/--port before
the model loads (one unset or empty, or an address it cannot bind: exit 2 at once; the other ranks stop
too, by torchrun or, launched without it as a bare `srun` launches them, told by rank 0 through the
process group's store) and listens only once the model has loaded and the service is built. What the
checkpoint's model settings refuse (a tokenizer with more ids than the model's vocabulary, a --max-length
its positions cannot hold) is refused before the weights load too.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
from typing import Optional

from engine.cli_types import ArgumentParser
from polar.serve.http_protocol import http_protocol, uvicorn_untested
from polar.serve.listen_socket import (AddressError, _url, bind, listen, open_files_shortfall,
                                       raise_open_files_limit)


def parse_args(argv=None):
    from engine.config import ATTENTION_BACKENDS

    class Formatter(argparse.RawDescriptionHelpFormatter):
        """The module docstring as written, and each option's default after its help where the help
        does not already say it."""

        def _get_help_string(self, action):
            text = action.help or ""
            if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
                return text
            return f"{text} (default: %(default)s)"

    ap = ArgumentParser(prog="polar serve", description=__doc__, formatter_class=Formatter)
    ap.add_argument("--checkpoint", required=True,
                    help="engine checkpoint: a run directory, its checkpoints/ directory or one step_N directory")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (0.0.0.0 for every interface; set --api-key-env then)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on")
    ap.add_argument("--tokenizer", default=None,
                    help="'byte' or a directory holding tokenizer.json (default: the one the run trained with)")
    ap.add_argument("--model-name", default="polar", help="the name answers report")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="longest a request waits for others to batch with")
    ap.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per forward pass")
    ap.add_argument("--row-tokens", type=int, default=4096,
                    help="packed row length, and the most tokens one shared-prefix group may hold "
                         "(a longer item gets a row of its own); at most the model's max_position_embeddings")
    ap.add_argument("--pack-rows", choices=("auto", "on", "off"), default="auto",
                    help="several groups per packed row (auto: on with the triton attention kernel, off "
                         "otherwise: with blocks, the CPU default, and with the torch reference, whose dense mask "
                         "costs row_length^2)")
    ap.add_argument("--max-queue", type=int, default=8192, help="items waiting before requests get 429")
    ap.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024,
                    help="largest request body; a longer one gets 413")
    ap.add_argument("--max-items", type=int, default=4096, help="items per request")
    ap.add_argument("--max-preparing", type=int, default=32,
                    help="requests parsed and tokenized at once, their body read; more wait for a slot, in arrival "
                         "order (reading a body takes none: it waits on the client's network)")
    ap.add_argument("--max-reading-bytes", type=int, default=None,
                    help="body bytes held at once for the requests being read, parsed and tokenized, each charged "
                         "its Content-Length (--max-body-bytes when chunked), at least 64 KiB; a request that does "
                         "not fit waits (default: --max-preparing x --max-body-bytes)")
    ap.add_argument("--max-preparing-wait-s", type=float, default=5.0,
                    help="how long a request waits for room to be read in (--max-reading-bytes) before it gets "
                         "429, its body unread")
    ap.add_argument("--max-waiting", type=int, default=None,
                    help="requests waiting for room to be read in at once; more get 429 at once, their body "
                         "unread (default: --max-queue, as many one-item requests as the queue holds)")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per-request limit on scoring; 504 after it")
    ap.add_argument("--read-timeout-s", type=float, default=60.0,
                    help="the whole body must arrive within this many seconds of the request being admitted; "
                         "a client that stalls gets 408 and its room (--max-reading-bytes) is freed. A request's "
                         "head must arrive within it of the connection opening (or of the answer before it), "
                         "else 408 and the connection is closed: an idle kept-alive connection is closed after it")
    ap.add_argument("--api-key-env", default=None,
                    help="name of an environment variable holding a bearer token every request must carry")
    ap.add_argument("--max-length", type=int, default=None,
                    help="POLAR truncation of structured items (default 16384, or less where the model's positions "
                         "hold no item of that length: the largest that fits, said at start-up)")
    # --max-response-length is the name `polar score`, `polar eval` and `polar format` use (the client's)
    ap.add_argument("--max-response", "--max-response-length", type=int, default=None,
                    help="POLAR truncation of reference and output (default: min(4096, (L - 6) // 2) for the "
                         "--max-length L in use, given or its default: the largest that leaves L a prompt budget; "
                         "said at start-up when below 4096)")
    ap.add_argument("--max-item-tokens", type=int, default=0,
                    help="longest already-formatted text (/classify, /pooling) accepted, in tokens (default: the "
                         "longest the client's truncation at --max-length leaves: max-length + 15 for the byte "
                         "tokenizer); never more than the model's max_position_embeddings. Structured "
                         "items (/v1/rewards, /get_reward) are bounded by --max-length and the model's positions")
    ap.add_argument("--pooling-format", choices=("vllm", "lmdeploy"), default="vllm",
                    help="the answer of POST /pooling (both are always at /vllm/pooling and /lmdeploy/pooling)")
    ap.add_argument("--no-share-prefixes", action="store_true", help="score every item as its own sequence")
    ap.add_argument("--tp", type=int, default=0,
                    help="tensor-parallel size (default: the torchrun processes divided by --pp)")
    ap.add_argument("--pp", type=int, default=1,
                    help="pipeline stages (tp x pp = the torchrun processes: one replica)")
    ap.add_argument("--attention-backend", default="auto", choices=("auto", *ATTENTION_BACKENDS),
                    help="auto: triton on a GPU, blocks (per-group SDPA) on the CPU; torch is the dense-mask reference")
    ap.add_argument("--graceful-timeout-s", type=float, default=60.0,
                    help="on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    args = ap.parse_args(argv)
    if not args.read_timeout_s > 0:
        ap.error("--read-timeout-s must be positive")
    if not args.max_preparing_wait_s >= 0:
        ap.error("--max-preparing-wait-s must be 0 or more")
    if args.max_waiting is not None and args.max_waiting < 0:
        ap.error("--max-waiting must be 0 or more")
    if args.max_preparing < 1:
        ap.error("--max-preparing must be 1 or more")
    if args.max_queue < 1 or args.max_items < 1:
        ap.error("--max-queue and --max-items must be 1 or more")
    if args.max_items > args.max_queue:
        # a request is admitted whole: one larger than the queue enters only an empty queue
        ap.error(f"--max-items {args.max_items} is more than --max-queue {args.max_queue}: a request of more "
                 "items than the queue holds is admitted only into an empty queue (under any load it gets 429 "
                 "every time); lower --max-items or raise --max-queue")
    from polar.serve.admission import reading_bytes_bound

    try:
        reading_bytes_bound(args.max_reading_bytes, args.max_preparing, args.max_body_bytes)
    except ValueError as e:
        ap.error(str(e))
    if not 0 <= args.port <= 65535:
        ap.error("--port must be 0-65535")
    if args.pp < 1 or args.tp < 0:
        ap.error("--tp and --pp must be positive")
    if not args.tp:
        args.tp = max(1, int(os.environ.get("WORLD_SIZE", "1")) // args.pp)
    from polar.client_limits import usage_check

    usage_check(ap, args.max_length, args.max_response)
    return args


# The engine's settings that `polar serve` flags set: the engine names the setting in its messages,
# which the serve user knows by its flag. No vpp flag: a serve replica never interleaves its stages.
FLAG_OF_SETTING = {"train.attention_backend": "--attention-backend", "parallel.tp": "--tp", "parallel.pp": "--pp"}
_SETTING = re.compile(r"\b(parallel\.pp x parallel\.vpp = |(?:%s)(?!\w)(?:=('?)([\w.-]+)\2)?)"
                      % "|".join(map(re.escape, FLAG_OF_SETTING)))


def as_flags(message: str) -> str:
    """An engine message with `polar serve`'s flags for the settings they set: `train.attention_backend=triton`
    reads `--attention-backend triton`."""
    def flag(m):
        if m[1].startswith("parallel.pp x"):
            return "--pp "
        name = m[1].split("=", 1)[0]
        return FLAG_OF_SETTING[name] + (f" {m[3]}" if m[3] is not None else "")
    return _SETTING.sub(flag, message)


def settled_tokenizer(args, info):
    """The tokenizer (--tokenizer, else the checkpoint's), with args.max_length and args.max_response
    settled for the model's positions (polar/client_limits.py: a default lowered to what fits them,
    said on stderr; a given --max-length whose items pass them is a ValueError naming the largest
    that fits). A tokenizer with more ids than the model's vocabulary is a ValueError too. Needs only
    `info` (engine.inference.resolve_checkpoint: the step and its model settings): _run runs it on
    every rank before the weights are loaded and hands the tokenizer on to build_service."""
    from polar.checkpoint_tokenizer import check_vocabulary, choose
    from polar.client_limits import settle_lengths
    from polar.tokenizer import load_tokenizer

    # a tokenizer given that is not the checkpoint's is refused (TokenizerMismatch, a ValueError)
    tokenizer = load_tokenizer(choose(args.tokenizer, str(info.step_dir), "--tokenizer"))
    check_vocabulary(tokenizer, info.model.vocab_size, "wrong --tokenizer?")
    args.max_length, args.max_response, note = settle_lengths(args.max_length, args.max_response, tokenizer,
                                                              info.model.max_position_embeddings,
                                                              ("--max-length", "--max-response"))
    if note and int(os.environ.get("RANK", "0")) == 0:  # every rank settles the same lengths: said once
        print(f"polar serve: {note}", file=sys.stderr, flush=True)
    return tokenizer


def api_key(args) -> Optional[str]:
    """The bearer token --api-key-env names (None without it); a ValueError where that variable is
    unset or empty. Read on rank 0, the one that serves HTTP, before anything loads (main)."""
    if not args.api_key_env:
        return None
    key = os.environ.get(args.api_key_env)
    if not key:
        raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    return key


def build_service(args, scorer, tokenizer=None):
    """The Service rank 0 serves. `tokenizer`: settled_tokenizer's for scorer's checkpoint, as _run
    hands it on; None settles it here (a caller holding a scorer of its own)."""
    from polar.serve.app import ServeSettings, Service
    from polar.serve.batcher import Batcher
    from polar.client_limits import overrun
    from polar.serve.metrics import Metrics

    if tokenizer is None:
        tokenizer = settled_tokenizer(args, scorer.info)
    metrics = Metrics()
    pack_rows = args.pack_rows == "on" or (args.pack_rows == "auto" and scorer.attention_backend == "triton")
    batcher = Batcher(scorer.score, tokenizer.pad_id, max_wait_s=args.max_wait_ms / 1000,
                      max_batch_tokens=args.max_batch_tokens, row_tokens=args.row_tokens,
                      max_queue_items=args.max_queue, share_prefixes=not args.no_share_prefixes, pack_rows=pack_rows,
                      max_positions=scorer.max_positions, metrics=metrics)
    if batcher.row_tokens < args.row_tokens:
        print(f"polar serve: --row-tokens {args.row_tokens} lowered to the model's max_position_embeddings "
              f"{batcher.row_tokens}", file=sys.stderr)
    settings = ServeSettings(model_name=args.model_name, max_body_bytes=args.max_body_bytes,
                             max_items=args.max_items, timeout_s=args.timeout_s,
                             read_timeout_s=args.read_timeout_s, api_key=api_key(args),
                             max_length=args.max_length, max_response=args.max_response,
                             max_item_tokens=args.max_item_tokens or args.max_length + overrun(tokenizer),
                             pooling_format=args.pooling_format, max_preparing=args.max_preparing,
                             max_reading_bytes=args.max_reading_bytes, preparing_wait_s=args.max_preparing_wait_s,
                             max_waiting=args.max_waiting)
    return Service(tokenizer, batcher, settings, metrics)


@contextlib.contextmanager
def serve_in_thread(service, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0):
    """The app on uvicorn in a background thread (a trainer's own process, tests, benchmarks);
    port 0 picks a free one. Yields the base URL; on exit shuts down gracefully."""
    import threading
    import time

    import uvicorn

    from polar.serve.app import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                                           http=http_protocol(service.settings.read_timeout_s)))
    thread = threading.Thread(target=server.run, name="polar-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"polar serve: the HTTP server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(start_timeout_s)


def main(argv=None) -> int:
    args = parse_args(argv)
    # the HTTP stack before the model loads: where it is not installed, that is said in a second, not after
    # minutes of loading (polar.cli names the extra that installs it)
    for module in ("uvicorn", "polar.serve.app"):
        importlib.import_module(module)
    from engine.cuda_env import order_tp_launches

    order_tp_launches(args.tp)  # before the first CUDA call
    # RewardScorer.load refuses a world other than tp x pp processes, so global rank 0 is the
    # replica's rank 0, the one that serves HTTP. Bound before the model loads: a taken port fails
    # in a second or two, not minutes later; torchrun then stops the other ranks, which are still
    # starting (init_process_group), when this one exits; without torchrun, _bind_said tells them.
    # --api-key-env likewise, on rank 0 alone: the other ranks never read it, and a launch on several
    # hosts may set the secret only where rank 0 runs.
    sock = files = refused = None
    if int(os.environ.get("RANK", "0")) == 0:
        files = raise_open_files_limit()
        try:
            api_key(args)
            sock = bind(args.host, args.port)
        except (ValueError, AddressError) as e:
            refused = str(e)
            print(f"polar serve: {refused}", file=sys.stderr, flush=True)
    # held until _run returns: on rank 0 its server is the process group's store (see _bind_said)
    store, refused = _bind_said(refused) if _without_torchrun() else (None, refused)
    if refused is not None:
        if files is None:  # a rank > 0
            print(f"polar serve rank {os.environ['RANK']}: rank 0 cannot serve ({refused}); stopping",
                  file=sys.stderr)
        return 2
    try:
        return _run(args, sock, files)
    finally:
        if sock is not None:
            sock.close()


def _without_torchrun() -> bool:
    """Ranks started one by one (a bare `srun`, or by hand: RANK, WORLD_SIZE, MASTER_ADDR/PORT set), with
    no torchrun to stop the others when rank 0 exits."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" not in os.environ
            and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ)


def _bind_said(refused: Optional[str]):
    """-> (store, refused) on every rank: rank 0's refusal of --api-key-env or --host/--port (None: bound), as
    rank 0 says it.

    A rank 0 that exited alone left the others in init_process_group, waiting for its store up to the
    c10d timeout (parallel.timeout_minutes, 30): a SLURM step hung instead of failing. So rank 0 hosts the
    store at MASTER_ADDR:MASTER_PORT first and puts its answer there; the others read it before they start
    their process group. Rank 0 waits (as long as they would have) until every other rank has read it,
    since the store leaves with it: refused, it leaves at once; bound, it may leave a moment later, at a
    refusal every rank finds before any process group (a --max-length the model's positions cannot hold),
    and a rank that had not read it by then waited for the store until the timeout. Bound, it keeps `store`:
    init_process_group's store on rank 0 (env://, multi-tenant) then shares its server, which would
    close when the last store on it goes."""
    from datetime import timedelta

    import torch.distributed as dist

    from engine.config import ParallelConfig

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(minutes=ParallelConfig().timeout_minutes)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=rank == 0,
                          timeout=timeout, multi_tenant=True)
    if rank == 0:
        store.set("polar_serve/refused", refused or "")
        with contextlib.suppress(dist.DistError):  # one that never came: refused, this rank still exits 2
            store.wait(["polar_serve/all_read"])
        return store, refused
    refused = store.get("polar_serve/refused").decode() or None
    if store.add("polar_serve/read", 1) == world - 1:
        store.set("polar_serve/all_read", "")
    return store, refused


def _run(args, sock, files) -> int:
    """main's model load and service on every rank; `sock`: rank 0's, bound, not yet listening;
    `files`: rank 0's open files limits (raise_open_files_limit)."""
    from engine.inference import RewardScorer, resolve_checkpoint
    from engine.rank_stop import stop_alike

    try:
        # the model's settings only: a --max-length its positions cannot hold, or a tokenizer with ids past its
        # vocabulary, stops before the weights load (minutes for a 7B model). The step resolved here is the one
        # loaded, so nothing checked can differ after the load: a run directory's newest step may change in
        # between while its training goes on.
        info = resolve_checkpoint(args.checkpoint)
        tokenizer = settled_tokenizer(args, info)
        scorer = RewardScorer.load(str(info.step_dir), tp=args.tp, pp=args.pp, attention_backend=args.attention_backend)
    except (FileNotFoundError, ValueError) as e:
        # Decided by the flags, the world size and the checkpoint's files, which every rank reads alike: said
        # by rank 0 alone (each rank said it). A part of the weights that one rank alone cannot read is the
        # same CheckpointError on every rank, naming that rank (engine.checkpoint_load.load); any other error
        # is the traceback of the rank that met it.
        return stop_alike(int(os.environ.get("RANK", "0")), f"polar serve: {as_flags(str(e))}", 2)
    if not scorer.is_leader:
        _follow(scorer, _leader(scorer))
        scorer.close()
        return 0
    stop = _StopRequest()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    _leader(scorer)  # a collective: the followers learn where to forward their signals
    import uvicorn

    from polar.serve.app import create_app

    try:
        service = build_service(args, scorer, tokenizer)
        config = uvicorn.Config(create_app(service, on_shutdown=scorer.stop_followers), host=args.host,
                                port=args.port, log_level="warning", timeout_graceful_shutdown=args.graceful_timeout_s,
                                http=http_protocol(args.read_timeout_s))
        listen(sock, args.host, args.port, config.backlog)
    except (ValueError, AddressError) as e:
        print(f"polar serve: {e}", file=sys.stderr)
        scorer.stop_followers()
        scorer.close()  # the followers wait at its barrier: leaving without it fails theirs
        return 2
    server = uvicorn.Server(config)
    stop.attach(server)
    before, limit, hard = files
    for warning in (open_files_shortfall(args, limit, hard), uvicorn_untested(uvicorn.__version__)):
        if warning:
            print(f"polar serve: warning: {warning}", file=sys.stderr, flush=True)
    raised = f" (open files limit raised from {before} to {limit})" if limit != before else ""
    print(f"polar serve: {scorer.info.step_dir} ({scorer.dtype}, tp={args.tp} pp={args.pp}) on "
          f"{_url(args.host, sock)}{raised}", flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal under the handlers it
    # found: `stop`'s let this process close the runtime (the replica's ranks meet at its barrier) and exit 0.
    server.run(sockets=[sock])
    scorer.close()
    return 0


class _StopRequest:
    """Rank 0's SIGINT/SIGTERM handler outside uvicorn's (which it installs only while serving): a
    signal that arrives while the service is built, from the operator or forwarded by a follower,
    stops the server right after it starts, through the same graceful shutdown."""

    def __init__(self):
        self.requested = False
        self.server = None

    def __call__(self, *_):
        self.requested = True
        if self.server is not None:
            self.server.should_exit = True

    def attach(self, server) -> None:
        self.server = server  # first: a signal from here on reaches the server itself
        server.should_exit = self.requested


def _leader(scorer) -> tuple[str, int]:
    """(host name, pid) of the replica's rank 0, on every rank (a collective: all must call it)."""
    import socket

    import torch.distributed as dist

    if scorer.rt.tp * scorer.rt.pp == 1:
        return socket.gethostname(), os.getpid()
    mp = scorer.rt.groups.mp
    box = [(socket.gethostname(), os.getpid())]
    dist.broadcast_object_list(box, src=dist.get_global_rank(mp, 0), group=mp, device=scorer.device)
    return box[0]


def _follow(scorer, leader: tuple[str, int]) -> None:
    """A rank > 0: forward passes until rank 0 broadcasts stop.

    torchrun and SLURM send SIGTERM to every rank at once. A follower that died of it would leave
    rank 0 without the ranks it needs to finish the requests in flight and to hear its stop (gloo:
    "Connection closed by peer" tracebacks; NCCL: a hang). So a follower's SIGINT/SIGTERM goes to
    rank 0 as SIGTERM (a second SIGINT would make uvicorn drop the requests in flight), and the
    follower stops when rank 0 says so: one sent to a follower alone stops the replica the same way.
    The loop runs in a thread because Python runs a signal handler in the main thread between
    bytecodes, never while it waits inside a broadcast, and a follower waits there between batches.
    """
    import socket
    import threading

    import torch

    host, pid = leader

    def to_leader(*_):
        if host != socket.gethostname():
            print(f"polar serve rank {os.environ.get('RANK', '?')}: signalled; rank 0 (pid {pid} on {host}) "
                  "stops this replica: signal it there", file=sys.stderr, flush=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    failed = []

    def follow():
        try:
            # the current CUDA device is per thread (rank 0's batcher thread sets it the same way)
            with torch.cuda.device(scorer.device) if scorer.rt.is_cuda else contextlib.nullcontext():
                scorer.follow()
        except BaseException as e:  # re-raised in the main thread: a real failure, traceback and all
            failed.append(e)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, to_leader)
    thread = threading.Thread(target=follow, name="polar-serve-follow", daemon=True)
    thread.start()
    thread.join()  # interruptible: the handler runs while the main thread waits here
    if failed:
        raise failed[0]


if __name__ == "__main__":
    sys.exit(main())
