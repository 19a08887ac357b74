"""`polar sample` end to end against a fake OpenAI-compatible server on loopback."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from polar import sample
from polar.records import append_locked
from polar.repetition import truncate_loop
from polar.sample import request_seed
from polar.tokenizer import ByteTokenizer
from tests.polar.openai_server import FakeOpenAIServer, closed_port, fake_loop_text, fake_text
from tests.polar.sample_helpers import jsonl_records, minimal_argv

MODELS = {"base-a": "ok", "base-b": "ok", "chatty": "ok", "looper": "loop", "broken": "fail"}
GOOD = {"base-a", "base-b", "chatty", "looper"}
DOCS = ["The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
        "Ünïcödé text with multi-byte characters: 日本語のテキスト and more words after it.",
        "",  # a blank line is not a document
        "A third document about reward models, policies and the data they are trained on, " * 3,
        "Short one."]
INSTRUCTIONS = [{"prompt": "Write a haiku about rivers."},
                {"prompt": [{"role": "user", "content": "Explain gradient descent."}]},
                {"prompt": ""}]  # not a prompt: skipped and counted


def _write_inputs(tmp_path, srv, extra_pool=()):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    inst = tmp_path / "instructions.jsonl"
    inst.write_text("".join(json.dumps(r) + "\n" for r in INSTRUCTIONS), encoding="utf-8")
    pool = [{"name": m, "base_url": srv.base_url, "model": m, "max_concurrency": 2,
             **({"kind": "chat"} if m == "chatty" else {})} for m in MODELS]
    pool += list(extra_pool)
    pool_path = tmp_path / "pool.yaml"
    pool_path.write_text(yaml.safe_dump(pool), encoding="utf-8")
    return corpus, inst, pool_path


def _argv(corpus, inst, pool, out, *extra, n=24):
    return ["--corpus", str(corpus), "--instruction-prompts", str(inst), "--instruction-share", "0.25",
            "--pool", str(pool), "--output", str(out), "--num-prompts", str(n), "--seed", "7",
            "--prefix-min-tokens", "1", "--prefix-max-tokens", "40", "--concurrency", "6",
            "--retry-base", "0.001", "--retry-cap", "0.01", "--max-retries", "3", "--endpoint-max-failures", "3",
            "--request-timeout", "10", "--progress-interval", "0.05", *extra]


def _by_id(records):
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "duplicate ids"
    return {r["id"]: r for r in records}


def _expected(model, prompt, seed):
    fn = fake_loop_text if MODELS[model] == "loop" else fake_text
    return truncate_loop(fn(model, prompt, seed))[0]


def test_end_to_end_records_policies_and_failing_endpoints(tmp_path, capsys):
    dead = {"name": "closed", "base_url": f"http://127.0.0.1:{closed_port()}/v1", "model": "x"}
    with FakeOpenAIServer(MODELS) as srv:
        corpus, inst, pool = _write_inputs(tmp_path, srv, [dead])
        out = tmp_path / "out.jsonl"
        rc = sample.main(_argv(corpus, inst, pool, out))
        err = capsys.readouterr().err
        bodies = list(srv.requests)
    assert rc == 0, err
    recs = _by_id(jsonl_records(out))
    assert sorted(recs) == list(range(24))
    docs = [d for d in DOCS if d]
    sources = set()
    for i, r in recs.items():
        assert r["wrapper"] == "pretrain"
        assert all(isinstance(r[k], str) for k in ("prompt", "reference", "chosen", "rejected"))
        a, b = r["policy_a"], r["policy_b"]
        assert a != b and {a, b} <= GOOD
        # A answered twice with different seeds, B once: each text is exactly what that model gives
        assert r["reference"] == _expected(a, r["prompt"], request_seed(7, i, "reference"))
        assert r["chosen"] == _expected(a, r["prompt"], request_seed(7, i, "chosen"))
        assert r["rejected"] == _expected(b, r["prompt"], request_seed(7, i, "rejected"))
        assert r["reference"] != r["chosen"]
        sources.add(r["source"])
        if r["source"] == "corpus":
            assert 1 <= r["prompt_tokens"] <= 40
            assert any(d.startswith(r["prompt"]) for d in docs), r["prompt"]
            assert len(ByteTokenizer().encode(r["prompt"])) == r["prompt_tokens"]
        else:
            assert r["prompt"] in ("Write a haiku about rivers.", "Explain gradient descent.")
        loop_roles = {"reference", "chosen"} if a == "looper" else set()
        loop_roles |= {"rejected"} if b == "looper" else set()
        assert set(r["truncated_loops"]) == loop_roles
        for role in loop_roles:
            # one copy of the loop is kept; it can be a rotation of the chunk, since the periodic run
            # starts a few characters early where the text before it ends like the chunk does
            assert r[role].count("again and again") == 1 and "we go rou" in r[role]
        assert set(r["skipped_policies"]) <= {"broken", "closed"}
    assert sources == {"corpus", "instruction"}
    assert any(r["skipped_policies"] for r in recs.values())
    assert any(r["truncated_loops"] for r in recs.values())
    # the failing endpoints are reported, taken out, and never appear in a record
    assert "'broken'" in err and "'closed'" in err and "leaves the pool" in err
    assert "broken:" in err and "DOWN" in err and "http 500" in err and "connection" in err
    assert "done 24/24" in err and "prompts/s" in err
    assert "1 empty lines skipped" in err
    assert "2 instruction prompts (1 empty skipped)" in err  # an empty instruction was dropped without a word
    # sampling settings reach the server; the chat policy gets a message list
    good = [b for b in bodies if b["model"] in GOOD]
    assert all(b["temperature"] == 1.0 and b["top_p"] == 0.9 and b["top_k"] == 50 and b["max_tokens"] == 4096
               for b in good)
    assert all(b["_path"] == "/v1/chat/completions" and b["messages"][0]["role"] == "user"
               for b in good if b["model"] == "chatty")
    assert os.path.getsize(str(out) + ".failures.jsonl") == 0


def test_restart_after_stop_and_torn_line_gives_the_uninterrupted_result(tmp_path, capsys):
    with FakeOpenAIServer(MODELS) as srv:
        corpus, inst, pool = _write_inputs(tmp_path, srv)
        full = tmp_path / "full.jsonl"
        assert sample.main(_argv(corpus, inst, pool, full)) == 0
        part = tmp_path / "part.jsonl"
        assert sample.main(_argv(corpus, inst, pool, part, "--max-records", "7")) == 0
        assert len(jsonl_records(part)) == 7
        with open(part, "a", encoding="utf-8") as f:
            f.write('{"prompt": "torn by a ki')  # what a kill mid-write leaves
        capsys.readouterr()
        assert sample.main(_argv(corpus, inst, pool, part)) == 0
        err = capsys.readouterr().err
    assert "incomplete" in err and "7 of 24 prompts already" in err
    assert _by_id(jsonl_records(part)) == _by_id(jsonl_records(full))


def test_killed_process_resumes_without_duplicates_or_losses(tmp_path):
    # A real SIGKILL mid-run: whatever state the output is left in, the rerun must complete it. The
    # server holds every request after half of a whole run's, so the kill lands mid-run however
    # fast or slow the machine is.
    with FakeOpenAIServer(MODELS) as srv:
        corpus, inst, pool = _write_inputs(tmp_path, srv)
        full = tmp_path / "full.jsonl"
        assert sample.main(_argv(corpus, inst, pool, full, n=40)) == 0
        srv.hold_after = srv.served + srv.served // 2
        out = tmp_path / "killed.jsonl"
        argv = _argv(corpus, inst, pool, out, n=40)
        proc = subprocess.Popen([sys.executable, "-m", "polar.sample", *argv], stderr=subprocess.PIPE,
                                cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, "no 5 records before the hold"
            time.sleep(0.005)
        proc.kill()
        proc.communicate()
        killed_at = out.read_bytes().count(b"\n")
        assert 5 <= killed_at < 40
        srv.hold_after = None
        srv.release()
        assert sample.main(argv) == 0
    assert _by_id(jsonl_records(out)) == _by_id(jsonl_records(full))


def test_server_that_starts_failing_then_recovers(tmp_path, capsys):
    with FakeOpenAIServer(MODELS, fail_after=20) as srv:
        corpus, inst, pool = _write_inputs(tmp_path, srv)
        out = tmp_path / "out.jsonl"
        assert sample.main(_argv(corpus, inst, pool, out)) == 1
        err = capsys.readouterr().err
        first = jsonl_records(out)
        failures = [json.loads(line) for line in open(str(out) + ".failures.jsonl")]
        assert failures and all(f["reason"] for f in failures)
        assert "fewer than 2 policies" in err
        assert len(first) < 24
        srv.fail_after = None
        assert sample.main(_argv(corpus, inst, pool, out)) == 0
        full = tmp_path / "full.jsonl"
        assert sample.main(_argv(corpus, inst, pool, full)) == 0
    # the failed prompts were retried; nothing lost, nothing doubled, same records as one clean run
    assert _by_id(jsonl_records(out)) == _by_id(jsonl_records(full))
    assert os.path.getsize(str(out) + ".failures.jsonl") == 0


def test_an_endpoint_refusing_every_request_leaves_at_once_and_fails_no_prompt(tmp_path, capsys):
    """A 404 (model name), 401 or 403 fails every request of that endpoint: it used to fail each prompt
    drawn for it until --endpoint-max-failures was reached, and a rerun retried only those few
    prompts, never reaching the limit, so they failed again on every rerun."""
    ghost = {"name": "ghost", "model": "no-such-model", "max_concurrency": 2}
    with FakeOpenAIServer(MODELS) as srv:
        corpus, inst, pool = _write_inputs(tmp_path, srv, [{**ghost, "base_url": srv.base_url}])
        out = tmp_path / "out.jsonl"
        assert sample.main(_argv(corpus, inst, pool, out)) == 0  # --endpoint-max-failures 3
        err = capsys.readouterr().err
    recs = jsonl_records(out)
    assert len(recs) == 24 and os.path.getsize(str(out) + ".failures.jsonl") == 0
    assert not any("ghost" in (r["policy_a"], r["policy_b"]) for r in recs)
    assert any("ghost" in r["skipped_policies"] for r in recs)
    assert len(re.findall(r"endpoint 'ghost' .* leaves the pool: http 404", err)) == 1, err
    assert re.search(r"ghost: 0/[12] requests ok", err), err  # the first refusals (2 at once), not one a prompt


def test_rate_limited_endpoint_is_retried_not_dropped(tmp_path, capsys):
    models = {"base-a": "busy", "base-b": "busy"}
    with FakeOpenAIServer(models) as srv:
        pool = tmp_path / "pool.yaml"
        pool.write_text(yaml.safe_dump([{"base_url": srv.base_url, "model": m} for m in models]))
        corpus = tmp_path / "c.txt"
        corpus.write_text("one document\nanother document\n")
        out = tmp_path / "o.jsonl"
        rc = sample.main(["--corpus", str(corpus), "--pool", str(pool), "--output", str(out), "--num-prompts", "5",
                          "--retry-base", "0.001", "--endpoint-max-failures", "1", "--max-retries", "2"])
        err = capsys.readouterr().err
    assert rc == 0, err
    assert len(jsonl_records(out)) == 5
    # every request was refused once and then served; 429 never takes an endpoint out, even at
    # --endpoint-max-failures 1
    assert sum(int(n) for n in re.findall(r"http 429 x(\d+)", err)) == 15
    assert sum(int(n) for n in re.findall(r"(\d+)/\d+ requests ok", err)) == 15
    assert "DOWN" not in err


def test_changed_settings_stop_a_restart(tmp_path, capsys):
    with FakeOpenAIServer(MODELS) as srv:
        corpus, inst, pool = _write_inputs(tmp_path, srv)
        out = tmp_path / "out.jsonl"
        assert sample.main(_argv(corpus, inst, pool, out, n=3)) == 0
        capsys.readouterr()
        argv = _argv(corpus, inst, pool, out, n=3)
        argv[argv.index("--seed") + 1] = "8"
        assert sample.main(argv) == 2
        assert "seed: 7 -> 8" in capsys.readouterr().err
        # a corpus grown between the runs drew other documents for the ids left: the paths alone passed it
        size = corpus.stat().st_size
        with open(corpus, "a", encoding="utf-8") as f:
            f.write("A document added after the first run.\n")
        argv = _argv(corpus, inst, pool, out, n=5)
        assert sample.main(argv) == 2
        assert f"corpus_bytes: [{size}] -> [{corpus.stat().st_size}]" in capsys.readouterr().err
        assert len(jsonl_records(out)) == 3
        # a record written before the sizes were kept lacks them (and the fingerprints, kept later): not a change
        run_json = tmp_path / "out.jsonl.run.json"
        old = json.loads(run_json.read_text())
        for key in ("corpus_bytes", "instruction_bytes", "corpus_sample_sha256", "instruction_sample_sha256"):
            del old[key]
        run_json.write_text(json.dumps(old))
        assert sample.main(argv) == 0, capsys.readouterr().err
        assert sorted(_by_id(jsonl_records(out))) == list(range(5))
        assert json.loads(run_json.read_text())["corpus_bytes"] == [corpus.stat().st_size]
        # the same files mounted at another path (a restart on another node): the same inputs, said
        moved = tmp_path / "mnt"
        moved.mkdir()
        shutil.copy(corpus, moved / corpus.name)
        shutil.copy(inst, moved / inst.name)
        assert sample.main(_argv(moved / corpus.name, moved / inst.name, pool, out, n=6)) == 0
        err = capsys.readouterr().err
        assert (f"--corpus read from {moved / corpus.name} (the output was written from {corpus}): the same file "
                "names, sizes and content, taken as the same files") in err, err
        assert f"--instruction-prompts read from {moved / inst.name}" in err, err
        # another file name is another input, whatever its bytes
        shutil.copy(corpus, moved / "other.txt")
        assert sample.main(_argv(moved / "other.txt", moved / inst.name, pool, out, n=7)) == 2
        assert f"corpus: ['{moved / corpus.name}'] -> ['{moved / 'other.txt'}']" in capsys.readouterr().err
        # another corpus of the same file name and size (its lines reordered) is not the same input: it
        # was taken as one, and the restart appended records of other documents under the ids left
        regenerated = tmp_path / "regenerated"
        regenerated.mkdir()
        (regenerated / corpus.name).write_text("".join(reversed(corpus.read_text(encoding="utf-8").splitlines(True))),
                                               encoding="utf-8")
        assert (regenerated / corpus.name).stat().st_size == corpus.stat().st_size
        assert sample.main(_argv(regenerated / corpus.name, moved / inst.name, pool, out, n=7)) == 2
        err = capsys.readouterr().err
        assert (f"corpus: {corpus.name}: the same name and size as the file the output was written from, but its "
                "content differs") in err, err
        assert "--corpus read from" not in err and "corpus_sample_sha256" not in err, err
        # a record written before the fingerprints were kept lacks them: nothing to compare, said as before
        old = json.loads(run_json.read_text())
        del old["corpus_sample_sha256"], old["instruction_sample_sha256"]
        run_json.write_text(json.dumps(old))
        assert sample.main(_argv(corpus, inst, pool, out, n=7)) == 0
        assert "the same file names, taken as the same files" in capsys.readouterr().err
        assert len(json.loads(run_json.read_text())["corpus_sample_sha256"]) == 1
    assert sorted(_by_id(jsonl_records(out))) == list(range(7))


@pytest.mark.parametrize("name, content, expected", [
    ("c.jsonl", '{"text": "fine"}\n{"text": "ok"}\n{"text": broken\n', "c.jsonl:3: not valid JSON"),
    ("c.jsonl", '{"text": "fine"}\n{"body": "no text"}\n', "c.jsonl:2: field 'text' is missing"),
    ("c.jsonl", '{"text": 12}\n', "c.jsonl:1: field 'text': expected a str"),
    ("c.jsonl", '[1, 2]\n', "c.jsonl:1: expected a JSON object"),
    # a key twice: which text is the document? (json.loads kept the last without a word)
    ("c.jsonl", '{"text": "fine"}\n{"text": "a", "text": "b"}\n', "c.jsonl:2: field 'text' given twice in one object"),
    # an integer json refuses to convert, and nesting too deep for it: were tracebacks
    ("c.jsonl", '{"text": "a", "n": ' + "1" * 5000 + '}\n', "c.jsonl:1: JSON that cannot be read: "),
    ("c.jsonl", '{"text": "a", "n": ' + "[" * 100_000 + "]" * 100_000 + '}\n', "c.jsonl:1: JSON nested too deeply"),
    ("c.txt", b"good line\nbad \xff byte\n", "c.txt:2: not valid UTF-8"),
    ("c.txt", "\n\n", "no non-empty documents"),
    # a JSON escape of a lone surrogate crashed the run at its first request (UnicodeEncodeError)
    ("c.jsonl", '{"text": "fine"}\n{"text": "bad \\ud800 doc"}\n', "c.jsonl:2: field 'text': lone surrogate U+D800"),
])
def test_bad_corpus_lines_name_file_and_line(tmp_path, capsys, name, content, expected):
    corpus = tmp_path / name
    corpus.write_bytes(content if isinstance(content, bytes) else content.encode())
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump([{"model": m, "base_url": "http://127.0.0.1:9/v1"} for m in "ab"]))
    rc = sample.main(["--corpus", str(corpus), "--pool", str(pool), "--output", str(tmp_path / "o.jsonl"),
                      "--num-prompts", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert sorted(os.listdir(tmp_path)) == sorted([name, "pool.yaml"])  # the output's files made empty are gone


def test_a_busy_or_unwritable_output_is_named_before_the_prompt_files_are_read(tmp_path, capsys):
    """Checking the prompt files reads every line (minutes for tens of GB): a second run on an output
    that another run writes, or an output where no file can be made, was told so only after it."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": broken\n')  # read, it would be the error named
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump([{"model": m, "base_url": "http://127.0.0.1:9/v1"} for m in "ab"]))
    out = tmp_path / "o.jsonl"
    argv = ["--corpus", str(corpus), "--pool", str(pool), "--num-prompts", "1", "--output"]
    held = append_locked(str(out), "polar sample")  # another run writing it
    try:
        assert sample.main(argv + [str(out)]) == 2
    finally:
        os.close(held)
    assert f"{out}: another polar sample is writing this output" in capsys.readouterr().err
    assert sample.main(argv + ["/proc/x.jsonl"]) == 2  # as a read-only mount (root writes any directory)
    assert "/proc/x.jsonl: cannot write the output: " in capsys.readouterr().err
    assert sample.main(argv + [str(out)]) == 2
    assert "c.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert out.exists() and not out.stat().st_size  # there before this run: kept


def test_empty_completions_are_failures_retried_by_the_next_run(tmp_path, capsys):
    # Every prompt draws two of these three policies, so each meets an empty reply ("" from the
    # completions API, null content from the chat API).
    models = {"base-a": "ok", "silent": "empty", "mute": "empty"}
    with FakeOpenAIServer(models) as srv:
        pool = [{"name": m, "base_url": srv.base_url, "model": m, "max_concurrency": 2,
                 **({"kind": "chat"} if m == "mute" else {})} for m in models]
        pool_path = tmp_path / "pool.yaml"
        pool_path.write_text(yaml.safe_dump(pool), encoding="utf-8")
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n".join(d for d in DOCS if d) + "\n", encoding="utf-8")
        out = tmp_path / "out.jsonl"
        argv = ["--corpus", str(corpus), "--pool", str(pool_path), "--output", str(out), "--num-prompts", "4",
                "--retry-base", "0.001", "--retry-cap", "0.01", "--max-retries", "2", "--progress-interval", "0.05"]
        assert sample.main(argv) == 1
        err = capsys.readouterr().err
        assert out.read_text() == ""
        failures = jsonl_records(str(out) + ".failures.jsonl")
        assert sorted(f["id"] for f in failures) == [0, 1, 2, 3]
        assert all("empty completion" in f["reason"] for f in failures)
        assert "4 prompts failed" in err and "empty completion x" in err
        srv.models["silent"] = srv.models["mute"] = "ok"  # the next run retries them
        assert sample.main(argv) == 0
    assert sorted(_by_id(jsonl_records(out))) == [0, 1, 2, 3]


def test_the_end_summary_counts_in_the_singular_and_points_at_the_failures_only_when_some_failed(tmp_path, capsys):
    """One prompt each: a run where none failed and one loop was cut (seed 1 draws the looper as B, whose
    one answer loops) says '0 prompts failed, 1 loop truncated', not '(listed in ...; a rerun retries
    them)' nor '1 loops'; one failed prompt is '1 prompt failed (...; a rerun retries it)'."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("one document about rivers and policies\n")

    def run(models, out):
        with FakeOpenAIServer(models) as srv:
            pool = tmp_path / "pool.yaml"
            pool.write_text(yaml.safe_dump([{"base_url": srv.base_url, "model": m, "name": m} for m in models]))
            sample.main(["--corpus", str(corpus), "--pool", str(pool), "--output", str(out), "--num-prompts", "1",
                         "--seed", "1", "--retry-base", "0.001", "--max-retries", "1"])
        return re.search(r"this run: .*", capsys.readouterr().err).group(0)

    out = tmp_path / "loop.jsonl"
    line = run({"base-a": "ok", "looper": "loop"}, out)
    assert [r["truncated_loops"] for r in jsonl_records(out)] == [["rejected"]]
    assert line.endswith(" 0 prompts failed, 1 loop truncated"), line
    out = tmp_path / "fail.jsonl"
    line = run({"base-a": "ok", "silent": "empty"}, out)
    assert line.endswith(f" 1 prompt failed (listed in {out}.failures.jsonl; a rerun retries it), 0 loops "
                         f"truncated"), line


def test_unknown_tokenizer_is_a_clear_error(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("doc\n")
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump([{"model": m, "base_url": "http://127.0.0.1:9/v1"} for m in "ab"]))
    rc = sample.main(["--corpus", str(corpus), "--pool", str(pool), "--output", str(tmp_path / "o.jsonl"),
                      "--num-prompts", "1", "--tokenizer", str(tmp_path / "no-such-tokenizer")])
    err = capsys.readouterr().err
    assert rc == 2 and "--tokenizer" in err and "no-such-tokenizer" in err, err


def test_the_eta_of_a_run_stopped_by_max_records_is_the_time_to_that_stop(tmp_path):
    s = sample.Sampler(sample.RunConfig(num_prompts=1_000_000, max_records=60), None, [], str(tmp_path / "o"),
                       str(tmp_path / "f"))
    s.endpoints, s.written = {}, 50
    s.t0 = time.perf_counter() - 100  # 0.5 prompts/s: the last 10 records take 20 s, not 555 h
    assert "| 0.50 prompts/s | eta 0m20s |" in s._progress_line()
    s.cfg.max_records = None
    assert "| eta 555h" in s._progress_line()


@pytest.mark.parametrize("flag", ["--output", "--failures"])
def test_an_output_that_is_a_directory_is_a_clear_error(tmp_path, capsys, flag):
    (tmp_path / "d").mkdir()
    argv = minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o.jsonl"))
    argv += [flag, str(tmp_path / "d")]
    assert sample.main(argv) == 2
    assert f"{flag} {tmp_path / 'd'}: is a directory" in capsys.readouterr().err


def test_the_failures_file_gets_its_directory_and_an_unwritable_place_is_a_clear_error(tmp_path, capsys):
    with FakeOpenAIServer({"a": "ok", "b": "ok"}) as srv:
        argv = minimal_argv(tmp_path, srv.base_url, "--output", str(tmp_path / "o.jsonl"))
        failures = tmp_path / "logs" / "failures.jsonl"  # its directory was not made: a traceback
        assert sample.main(argv + ["--failures", str(failures)]) == 0, capsys.readouterr().err
    assert failures.exists() and len(jsonl_records(tmp_path / "o.jsonl")) == 2
    (tmp_path / "f").write_text("")
    for flag in ("--output", "--failures"):
        argv = minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o2.jsonl"))
        assert sample.main(argv + [flag, str(tmp_path / "f" / "x.jsonl")]) == 2
        assert f"{flag} {tmp_path / 'f' / 'x.jsonl'}: {tmp_path / 'f'} is a file, not a directory" \
            in capsys.readouterr().err
    # a place no file can be made (as a read-only mount, a directory without write permission, which
    # root, running the tests here, would write anyway): a traceback at the lock or at the run's start
    for flag, expected in (("--output", "/proc/x.jsonl: cannot write the output: "),
                           ("--failures", "--failures /proc/x.jsonl: cannot write: ")):
        argv = minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o3.jsonl"))
        assert sample.main(argv + [flag, "/proc/x.jsonl"]) == 2
        assert expected in capsys.readouterr().err


def test_a_completion_holding_a_lone_surrogate_is_a_failure_retried_by_the_next_run(tmp_path, capsys):
    """Such a record is one every build rejects (records.py): like an empty completion, the prompt
    is listed as failed and sampled again, instead of being marked done and lost at build time."""
    with FakeOpenAIServer({"a": "ok", "b": "surrogate"}) as srv:
        argv = minimal_argv(tmp_path, srv.base_url, "--output", str(tmp_path / "o.jsonl"))
        assert sample.main(argv) == 1
        assert (tmp_path / "o.jsonl").read_text() == ""
        failures = jsonl_records(str(tmp_path / "o.jsonl") + ".failures.jsonl")
        assert sorted(f["id"] for f in failures) == [0, 1]
        assert all("lone surrogate" in f["reason"] for f in failures)
        err = capsys.readouterr().err
        assert "invalid text x" in err and "DOWN" not in err, err  # counted, and not the endpoint's fault
        srv.models["b"] = "ok"
        assert sample.main(argv) == 0
    assert sorted(_by_id(jsonl_records(tmp_path / "o.jsonl"))) == [0, 1]
