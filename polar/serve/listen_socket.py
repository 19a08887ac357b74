"""Rank 0's listening socket and its open files: --host/--port bound before the model loads (a taken
port or a foreign address is said at once, not after minutes of loading) and listened on once the service
is built, refusals worded by the flag to change (AddressError); and the open files limit, one a
connection: raised to the hard limit, warned of where under what the settings let wait at once.
"""
from __future__ import annotations

import contextlib
from typing import Optional


class AddressError(OSError):
    """--host/--port cannot be bound or listened on; the message names the flag."""


def _address_error(e: OSError, host: str, port: int) -> AddressError:
    import errno
    import socket

    if isinstance(e, socket.gaierror):
        return AddressError(f"--host {host}: {e.strerror.lower()}")
    if e.errno == errno.EADDRINUSE:
        return AddressError(f"--port {port}: address already in use (--host {host}): another process listens "
                            "there; stop it or choose another --port")
    if e.errno == errno.EADDRNOTAVAIL:
        return AddressError(f"--host {host}: cannot assign requested address (not an address of this machine)")
    if e.errno == errno.EACCES and 0 < port < 1024:
        return AddressError(f"--port {port}: permission denied (a port below 1024 needs privileges)")
    return AddressError(f"--host {host} --port {port}: {(e.strerror or str(e)).lower()}")


def bind(host: str, port: int):
    """A TCP socket bound to (host, port), not yet listening: bound before the model loads (minutes
    for a 7B model) so that a taken port or a foreign address is reported at once, listening only
    once the service is built, since Kubernetes' startupProbe and load balancers read an open port
    as a server that answers. SO_REUSEADDR as uvicorn sets it: a restart binds while the previous
    server's connections sit in TIME_WAIT. Raises AddressError."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise _address_error(e, host, port) from None
    return sock


def listen(sock, host: str, port: int, backlog: int) -> None:
    """Opens the port. Two sockets with SO_REUSEADDR may both bind an address nobody listens on yet
    (two servers started at once on one port), and the second learns it only here."""
    try:
        sock.listen(backlog)
    except OSError as e:
        raise _address_error(e, host, port) from None


def _url(host: str, sock) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"


# Files this process holds besides its connections: shared libraries, the checkpoint's shards and
# tokenizer as they load, the event loop's and torch's own descriptors.
OWN_FILES = 256


def raise_open_files_limit() -> tuple[int, int, int]:
    """Raises this process's soft RLIMIT_NOFILE to its hard limit: each connection holds a file
    descriptor, and past the soft limit (often 1024) accept() fails with EMFILE, on which asyncio
    stops accepting for a second at a time ('socket.accept() out of system resource'), refusing
    everyone while the connections already open (idle kept-alive ones included) stay.
    -> (soft limit before, soft limit now, hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux bounds the hard limit (fs.nr_open); macOS may say unlimited yet refuse such a soft limit
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard


def open_files_shortfall(args, limit: int, hard: int) -> Optional[str]:
    """A warning when the open files limit is under the connections the settings let wait at once:
    each request waiting for room (--max-waiting) or queued (--max-queue items, one a request at
    most) holds its connection, and so does each being prepared; idle kept-alive ones come on top."""
    import resource

    waiting = args.max_queue if args.max_waiting is None else args.max_waiting
    need = waiting + args.max_queue + args.max_preparing + OWN_FILES
    if limit == resource.RLIM_INFINITY or limit >= need:
        return None
    return (f"the open files limit is {limit} (hard limit "
            f"{'unlimited' if hard == resource.RLIM_INFINITY else hard}), under the {need} this server may hold: "
            f"a connection for each of --max-waiting {waiting} requests waiting for room, --max-queue "
            f"{args.max_queue} one-item requests queued and --max-preparing {args.max_preparing} being prepared, "
            f"{OWN_FILES} for its own files, and idle kept-alive connections stay open --read-timeout-s "
            f"{args.read_timeout_s:g} s. Past the limit no connection is accepted (asyncio: 'socket.accept() out of "
            "system resource'): raise the hard limit (ulimit -Hn, systemd's LimitNOFILE, docker run --ulimit "
            "nofile=N:N) or lower --max-waiting and --max-queue")
