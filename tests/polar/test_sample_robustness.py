"""`polar sample` against endpoints that blip, servers that ask for a pause, a second run on the same
output, and pool files whose bad entry must be found by line; real HTTP on loopback throughout."""
import email.utils
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from polar import sample
from polar.records import read_records
from tests.polar.openai_server import FakeOpenAIServer, fake_text, picky_refuses
from tests.polar.sample_helpers import jsonl_records as _records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _inputs(tmp_path, base_url, models, **entry):
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump([{"model": m, "base_url": base_url, **entry} for m in models]))
    corpus = tmp_path / "c.txt"
    corpus.write_text("one document\nanother document\na third one\n")
    return ["--corpus", str(corpus), "--pool", str(pool), "--output", str(tmp_path / "o.jsonl")]


def test_a_blip_shorter_than_the_retry_schedule_takes_no_endpoint_out(tmp_path, capsys):
    """Every in-flight request of an endpoint fails at the same instant when its server or a proxy
    in front of it hiccups: 16 failures "in a row" within milliseconds took each endpoint out of the
    pool for the rest of a days-long run (here all three, stopping it with 60 prompts failed),
    though each request would have succeeded at its first retry."""
    with FakeOpenAIServer({"a": "ok", "b": "ok", "c": "ok"}, delay=0.05) as srv:
        argv = _inputs(tmp_path, srv.base_url, "abc", max_concurrency=16)
        srv.fail_after = 0  # every request gets 503 ...
        heal = threading.Timer(0.3, lambda: setattr(srv, "fail_after", None))  # ... for 0.3 s
        heal.start()
        try:
            rc = sample.main(argv + ["--num-prompts", "60", "--concurrency", "48", "--retry-base", "0.5",
                                     "--progress-interval", "5"])
        finally:
            heal.cancel()
        err = capsys.readouterr().err
    assert rc == 0, err
    assert "leaves the pool" not in err and "http 503 x" in err, err
    assert sorted(r["id"] for r in _records(tmp_path / "o.jsonl")) == list(range(60))


def test_a_dead_endpoint_still_leaves_before_its_prompts_fail(tmp_path, capsys):
    # With a long --retry-cap the endpoint leaves when a request has used up its retries on it, so
    # its prompts go to the other policies instead of the failures file.
    with FakeOpenAIServer({"a": "ok", "b": "ok", "broken": "fail"}) as srv:
        argv = _inputs(tmp_path, srv.base_url, ["a", "b", "broken"], max_concurrency=2)
        rc = sample.main(argv + ["--num-prompts", "12", "--retry-base", "0.001", "--retry-cap", "60",
                                 "--max-retries", "3", "--endpoint-max-failures", "3"])
        err = capsys.readouterr().err
    assert rc == 0, err
    assert "endpoint 'broken'" in err and "leaves the pool" in err, err
    assert len(_records(tmp_path / "o.jsonl")) == 12
    assert os.path.getsize(str(tmp_path / "o.jsonl") + ".failures.jsonl") == 0


class _Server:
    """A completions endpoint on loopback answering each request with `answer(body, first)`: (status,
    headers, payload), `first` telling the first request of its (prompt, seed); `arrivals` keeps the
    times they came."""

    def __init__(self, answer):
        self.arrivals: dict = {}
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = (body["prompt"], body.get("seed"))
                with lock:
                    times = server.arrivals.setdefault(key, [])
                    times.append(time.time())
                    first = len(times) == 1
                code, headers, payload = answer(body, first)
                data = json.dumps(payload).encode()
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(text: str) -> dict:
    return {"choices": [{"index": 0, "finish_reason": "stop", "text": text}]}


def _retry_after_server(wait: float) -> _Server:
    """Answers the first request of each (prompt, seed) with 429 and Retry-After as an HTTP date
    `wait` seconds ahead (RFC 9110 allows a date or seconds), the next with a completion."""
    def answer(body, first):
        if first:
            return 429, {"Retry-After": email.utils.formatdate(time.time() + wait, usegmt=True)}, \
                {"error": {"message": "rate limited"}}
        return 200, {}, _completion(fake_text(body["model"], body["prompt"], body.get("seed")))
    return _Server(answer)


def test_retry_after_given_as_an_http_date_is_honoured(tmp_path, capsys):
    # The date form was dropped for our own backoff: the retry came back within milliseconds.
    with _retry_after_server(wait=2.0) as srv:
        argv = _inputs(tmp_path, srv.base_url, "ab")
        rc = sample.main(argv + ["--num-prompts", "2", "--retry-base", "0.001", "--retry-cap", "10"])
        err = capsys.readouterr().err
        gaps = [t[1] - t[0] for t in srv.arrivals.values()]
    assert rc == 0, err
    assert len(gaps) == 6 and all(g >= 0.9 for g in gaps), gaps  # the date has whole seconds: 1-2 s


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    """Two runs of one command (a requeued job whose first copy still runs, a second terminal) both
    appended every prompt: the output held each id twice, and every later run stopped at the first
    repeated id, so the dataset could no longer be resumed."""
    with FakeOpenAIServer({"a": "ok", "b": "ok"}, hold_after=0) as srv:
        argv = _inputs(tmp_path, srv.base_url, "ab") + ["--num-prompts", "4", "--retry-base", "0.001"]
        first = subprocess.Popen([sys.executable, "-m", "polar.sample", *argv], cwd=ROOT,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not srv.requests:  # the first run is sampling (its requests are held)
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.01)
        second = subprocess.Popen([sys.executable, "-m", "polar.sample", *argv], cwd=ROOT,
                                  stderr=subprocess.PIPE, text=True)
        # a refusal ends the wait when it comes (a loaded 2-core machine took over 15 s to start the second
        # run); only a second run held like the first waits all of it out
        try:
            second_rc = second.wait(timeout=120)
        except subprocess.TimeoutExpired:
            second_rc = None  # it is sampling too, held like the first
        srv.release()
        _, second_err = second.communicate(timeout=60)
        _, first_err = first.communicate(timeout=60)
    assert first.returncode == 0, first_err
    assert second_rc == 2, second_err
    assert "another polar sample" in second_err and "o.jsonl" in second_err, second_err
    assert sorted(r["id"] for r in _records(tmp_path / "o.jsonl")) == [0, 1, 2, 3]


def _sample_one(tmp_path, pool, capsys) -> tuple[int, str]:
    """polar sample of one prompt with this pool: (exit status, stderr)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("doc\n")
    rc = sample.main(["--corpus", str(corpus), "--pool", str(pool), "--output", str(tmp_path / "o.jsonl"),
                      "--num-prompts", "1"])
    return rc, capsys.readouterr().err


def test_a_bad_pool_entry_is_named_by_its_line(tmp_path, capsys):
    # "entry 3" of a pool of dozens of endpoints (counted from 0) left the reader counting entries
    pool = tmp_path / "pool.yaml"
    pool.write_text("# pool of run 3\n"
                    "- {name: a, base_url: 'http://h:1/v1', model: m1}\n"
                    "- name: b\n"
                    "  base_url: http://h:1/v1\n"
                    "  model: m2\n"
                    "\n"
                    "- name: c\n"
                    "  base_url: http://h:1/v1\n"
                    "  model: m3\n"
                    "  max_concurrency: lots\n")
    rc, err = _sample_one(tmp_path, pool, capsys)
    assert rc == 2 and f"{pool}:7: entry 2 ('c'): field 'max_concurrency' must be a positive integer" in err, err
    # under a `policies:` key too
    pool.write_text("notes: run 3\npolicies:\n  - {base_url: 'http://h:1/v1', model: m1}\n  - {model: m2}\n")
    rc, err = _sample_one(tmp_path, pool, capsys)
    assert rc == 2 and f"{pool}:4: entry 1 ('m2'): field 'base_url' is required" in err, err


def test_a_pool_file_that_is_not_utf8_is_named_by_its_line(tmp_path, capsys):
    # was a UnicodeDecodeError traceback from inside the YAML reader (exit 1, no file named)
    pool = tmp_path / "pool.yaml"
    pool.write_bytes(b"- {model: a, base_url: 'http://h:1/v1'}\n- {model: b\xff, base_url: 'http://h:1/v1'}\n")
    rc, err = _sample_one(tmp_path, pool, capsys)
    assert rc == 2 and f"{pool}:2: not valid UTF-8" in err, err


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_sigterm_stops_like_ctrl_c(tmp_path, sigint):
    """A batch scheduler's stop (Slurm at the time limit, Kubernetes, `kill`) is SIGTERM: the run died
    at once, with no summary of what it had done and exit status -15 instead of 130 (interrupted,
    the same command continues). Also in a job started in the background (`cmd &`), which ignores
    SIGINT: passing SIGTERM on as SIGINT stopped nothing there."""
    with FakeOpenAIServer({"a": "ok", "b": "ok"}) as srv:
        argv = _inputs(tmp_path, srv.base_url, "ab") + ["--num-prompts", "6", "--retry-base", "0.001"]
        srv.hold_after = 3  # a record or more, then every request waits
        proc = subprocess.Popen([sys.executable, "-m", "polar.sample", *argv], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=_ignore_sigint if sigint == "ignored" else None)
        deadline = time.monotonic() + 60
        while len(srv.requests) < 6:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        time.sleep(0.2)
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            srv.release()
            proc.kill()
        assert proc.returncode == 130, err
        assert "interrupted; the same command continues" in err and "this run: " in err, err
        srv.hold_after = None
        assert sample.main(argv) == 0
    assert sorted(r["id"] for r in _records(tmp_path / "o.jsonl")) == list(range(6))


def test_an_endpoint_that_refuses_every_request_leaves_and_its_prompts_go_on(tmp_path, capsys):
    """A hosted API refusing a parameter (top_k) answers 400 to every request: each prompt drawn for
    it failed, and a rerun of those few failed them again without the endpoint ever leaving."""
    with FakeOpenAIServer({"a": "ok", "b": "ok", "c": "refuse"}) as srv:
        argv = _inputs(tmp_path, srv.base_url, "abc") + ["--num-prompts", "30", "--endpoint-max-failures", "3"]
        assert sample.main(argv) == 0
    err = capsys.readouterr().err
    assert "endpoint 'c'" in err and "leaves the pool: 3 requests in a row refused and none answered" in err, err
    assert "Unrecognized request argument supplied: top_k" in err
    records = _records(tmp_path / "o.jsonl")
    assert sorted(r["id"] for r in records) == list(range(30))
    assert all({r["policy_a"], r["policy_b"]} == {"a", "b"} for r in records)
    assert not os.path.exists(tmp_path / "o.jsonl.failures.jsonl") or not _records(tmp_path / "o.jsonl.failures.jsonl")


def test_a_prompt_one_policy_refuses_goes_to_the_next(tmp_path, capsys):
    """A refusal of one prompt (one too long for a server's context, say) is that policy's: the
    prompt is sampled from the next policies of its order and the endpoint stays, answering others."""
    with FakeOpenAIServer({"a": "ok", "b": "ok", "c": "picky"}) as srv:
        argv = _inputs(tmp_path, srv.base_url, "abc") + ["--num-prompts", "40", "--endpoint-max-failures", "50"]
        assert sample.main(argv) == 0
    assert "leaves the pool" not in capsys.readouterr().err
    records = _records(tmp_path / "o.jsonl")
    assert sorted(r["id"] for r in records) == list(range(40))
    with_c = [r for r in records if "c" in (r["policy_a"], r["policy_b"])]
    refused_c = [r for r in records if picky_refuses(r["prompt"])]
    assert with_c and refused_c  # both outcomes reached
    assert not any(picky_refuses(r["prompt"]) for r in with_c)
    # a prompt c refused names it among the policies skipped, where c came before the pair
    assert any("c" in r["skipped_policies"] for r in refused_c)


def test_a_reference_of_only_whitespace_sends_the_prompt_to_the_next_policies(tmp_path, capsys):
    """A base model may answer only newlines: such a reference was written as a done record, which
    every build rejects (records.check_reference), so the prompt was never sampled again."""
    def answer(body, first):
        blank = body["model"] == "blank"
        return 200, {}, _completion("\n" * 40 if blank else fake_text(body["model"], body["prompt"], body.get("seed")))
    with _Server(answer) as srv:
        argv = _inputs(tmp_path, srv.base_url, ["a", "b", "blank"])
        rc = sample.main(argv + ["--num-prompts", "20"])
        err = capsys.readouterr().err
    assert rc == 0, err
    assert len(list(read_records(str(tmp_path / "o.jsonl")))) == 20  # every record one a build takes
    records = _records(tmp_path / "o.jsonl")
    assert all(r["policy_a"] != "blank" for r in records)
    assert any("blank" in r["skipped_policies"] for r in records)
