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
from polar.policy_pool import PoolError, load_pool
from polar.prompt_sources import SampleError, token_prefix
from polar.records import append_locked
from polar.repetition import truncate_loop
from polar.sample import request_seed
from polar.sample_output import check_settings, read_done_ids
from polar.tokenizer import ByteTokenizer
from tests.polar.openai_server import FakeOpenAIServer, closed_port, fake_loop_text, fake_text

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


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


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
    recs = _by_id(_records(out))
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
        assert len(_records(part)) == 7
        with open(part, "a", encoding="utf-8") as f:
            f.write('{"prompt": "torn by a ki')  # what a kill mid-write leaves
        capsys.readouterr()
        assert sample.main(_argv(corpus, inst, pool, part)) == 0
        err = capsys.readouterr().err
    assert "incomplete" in err and "7 of 24 prompts already" in err
    assert _by_id(_records(part)) == _by_id(_records(full))


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
    assert _by_id(_records(out)) == _by_id(_records(full))


def test_server_that_starts_failing_then_recovers(tmp_path, capsys):
    with FakeOpenAIServer(MODELS, fail_after=20) as srv:
        corpus, inst, pool = _write_inputs(tmp_path, srv)
        out = tmp_path / "out.jsonl"
        assert sample.main(_argv(corpus, inst, pool, out)) == 1
        err = capsys.readouterr().err
        first = _records(out)
        failures = [json.loads(line) for line in open(str(out) + ".failures.jsonl")]
        assert failures and all(f["reason"] for f in failures)
        assert "fewer than 2 policies" in err
        assert len(first) < 24
        srv.fail_after = None
        assert sample.main(_argv(corpus, inst, pool, out)) == 0
        full = tmp_path / "full.jsonl"
        assert sample.main(_argv(corpus, inst, pool, full)) == 0
    # the failed prompts were retried; nothing lost, nothing doubled, same records as one clean run
    assert _by_id(_records(out)) == _by_id(_records(full))
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
    recs = _records(out)
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
    assert len(_records(out)) == 5
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
        assert len(_records(out)) == 3
        # a record written before the sizes were kept lacks them: not a change
        run_json = tmp_path / "out.jsonl.run.json"
        old = json.loads(run_json.read_text())
        del old["corpus_bytes"], old["instruction_bytes"]
        run_json.write_text(json.dumps(old))
        assert sample.main(argv) == 0, capsys.readouterr().err
        assert sorted(_by_id(_records(out))) == list(range(5))
        assert json.loads(run_json.read_text())["corpus_bytes"] == [corpus.stat().st_size]
        # the same files mounted at another path (a restart on another node): the same inputs, said
        moved = tmp_path / "mnt"
        moved.mkdir()
        shutil.copy(corpus, moved / corpus.name)
        shutil.copy(inst, moved / inst.name)
        assert sample.main(_argv(moved / corpus.name, moved / inst.name, pool, out, n=6)) == 0
        err = capsys.readouterr().err
        assert f"--corpus read from {moved / corpus.name} (the output was written from {corpus})" in err, err
        assert f"--instruction-prompts read from {moved / inst.name}" in err, err
        # another file name is another input, whatever its bytes
        shutil.copy(corpus, moved / "other.txt")
        assert sample.main(_argv(moved / "other.txt", moved / inst.name, pool, out, n=7)) == 2
        assert f"corpus: ['{moved / corpus.name}'] -> ['{moved / 'other.txt'}']" in capsys.readouterr().err
    assert sorted(_by_id(_records(out))) == list(range(6))


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b"\xff\xfe{}"])
def test_a_settings_record_that_is_no_json_object_is_named(tmp_path, content):
    path = tmp_path / "out.jsonl.run.json"
    path.write_bytes(content)  # a list was an AttributeError traceback, bytes that are no UTF-8 a UnicodeDecodeError
    with pytest.raises(SampleError, match=f"{path}: not a settings record \\(a JSON object\\); delete it"):
        check_settings(str(path), {"seed": 0}, allow_changed=False)


@pytest.mark.parametrize("entries, expected", [
    ([{"base_url": "http://h:1/v1"}, {"base_url": "http://h:1/v1", "model": "m"}],
     "entry 0: field 'model' is required"),
    ([{"model": "a", "base_url": "http://h/v1", "temprature": 1}, {"model": "b", "base_url": "http://h/v1"}],
     "entry 0 ('a'): unknown field(s) temprature"),
    ([{"model": "a", "base_url": "http://h/v1"}, {"model": "b", "base_url": "http://h/v1", "kind": "chats"}],
     "entry 1 ('b'): field 'kind' must be one of"),
    ([{"model": "a", "base_url": "h:8000"}, {"model": "b", "base_url": "http://h/v1"}], "field 'base_url' must be"),
    ([{"model": "a", "base_url": "http://h/v1", "max_concurrency": 0}, {"model": "b", "base_url": "http://h/v1"}],
     "field 'max_concurrency' must be a positive integer"),
    ([{"model": "a", "base_url": "http://h/v1"}, {"model": "a", "base_url": "http://g/v1"}],
     "entry 1 ('a'): field 'name' 'a' repeats entry 0"),
    ([{"model": "a", "base_url": "http://h/v1", "api_key_env": "POLAR_TEST_SURELY_UNSET"},
      {"model": "b", "base_url": "http://h/v1"}], "'POLAR_TEST_SURELY_UNSET', which is not set"),
    ([{"model": "a", "base_url": "http://h/v1"}], "at least 2 policies"),
    ({"model": "a"}, "expected a YAML list"),
    (["just a string", {"model": "b", "base_url": "http://h/v1"}], "entry 0: expected a mapping"),
])
def test_bad_pool_yaml_names_entry_and_field(tmp_path, capsys, entries, expected):
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump(entries))
    corpus = tmp_path / "c.txt"
    corpus.write_text("doc\n")
    rc = sample.main(["--corpus", str(corpus), "--pool", str(pool), "--output", str(tmp_path / "o.jsonl"),
                      "--num-prompts", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and str(pool) in err, err


def test_a_pool_key_variable_that_is_set_but_empty_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("POLAR_TEST_EMPTY_KEY", " ")  # no key was sent: a server wanting one refused every request
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump([{"model": "a", "base_url": "http://h/v1", "api_key_env": "POLAR_TEST_EMPTY_KEY"},
                                    {"model": "b", "base_url": "http://h/v1"}]))
    with pytest.raises(PoolError, match=r"pool.yaml:1: entry 0 \('a'\): field 'api_key_env' names "
                                        r"'POLAR_TEST_EMPTY_KEY', which is set but empty"):
        load_pool(str(pool))


def test_pool_yaml_syntax_error(tmp_path, capsys):
    pool = tmp_path / "pool.yaml"
    pool.write_text("- model: [a\n")
    corpus = tmp_path / "c.txt"
    corpus.write_text("doc\n")
    assert sample.main(["--corpus", str(corpus), "--pool", str(pool), "--output", str(tmp_path / "o"),
                        "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err
    # the position names the file (it was `in "<unicode string>", line 1, column 12`)
    assert "not valid YAML" in err and f'in "{pool}", line 1, column' in err and "<unicode" not in err, err


def test_pool_yaml_with_a_key_given_twice_is_refused(tmp_path, capsys):
    """PyYAML keeps the last value: an entry with two `model:` keys would query one model silently."""
    pool = tmp_path / "pool.yaml"
    pool.write_text("- name: a\n  base_url: http://127.0.0.1:1/v1\n  model: m1\n  model: m2\n"
                    "- name: b\n  base_url: http://127.0.0.1:1/v1\n  model: m3\n")
    corpus = tmp_path / "c.txt"
    corpus.write_text("doc\n")
    assert sample.main(["--corpus", str(corpus), "--pool", str(pool), "--output", str(tmp_path / "o"),
                        "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{pool}: not valid YAML: line 4: key 'model' given twice in one mapping" in err, err


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


def test_truncate_loop_refuses_a_single_copy_as_a_loop():
    with pytest.raises(ValueError, match="min_repeats must be at least 2, got 1"):
        truncate_loop("The quick brown fox jumps over the lazy dog near the riverbank.", 1)


def test_truncate_loop_rule():
    chunk = "the same sentence again. "
    base = "A normal start of a story."
    text, removed = truncate_loop(base + chunk * 5)
    assert text == base + chunk and removed == 4 * len(chunk)
    # a copy cut short by max_tokens belongs to the loop too
    assert truncate_loop(base + chunk * 5 + chunk[:9])[0] == base + chunk
    # a long run of one character
    assert truncate_loop("wait" + "!" * 50) == ("wait!", 49)
    # a text that is all loop, from its first character (the lower end of the search for the run's start)
    assert truncate_loop(chunk * 5) == (chunk, 4 * len(chunk))
    # short repetitions and ordinary text are left alone
    for t in ("ha ha ha ha", "Well...", "abc abc abc", "x = [1, 2, 3]\ny = 4\n", ""):
        assert truncate_loop(t) == (t, 0)
    # fewer than 4 copies is not a loop
    assert truncate_loop(base + chunk * 3) == (base + chunk * 3, 0)
    # a loop nested inside a loop: both go
    inner = "la" * 20
    assert truncate_loop("song: " + ("verse " + inner + " ") * 4)[0].startswith("song: verse la")


def test_token_prefix_cuts_at_whole_characters():
    tok = ByteTokenizer()
    assert token_prefix(tok, "hello world", 5) == ("hello", 5)
    # byte 2 of "é" would split the character: the cut moves back to "h"
    assert token_prefix(tok, "héllo", 2) == ("h", 1)
    assert token_prefix(tok, "é", 1) == ("é", 2)
    assert token_prefix(tok, "short", 100) == ("short", 5)
    long_doc = "word " * 5000
    assert token_prefix(tok, long_doc, 1024) == (long_doc[:1024], 1024)


def test_read_done_ids_cuts_a_torn_line_and_rejects_duplicates(tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": 0}\n{"id": 2}\n{"id": 3, "pro')
    assert read_done_ids(str(out)) == {0, 2}
    assert out.read_text() == '{"id": 0}\n{"id": 2}\n'
    assert "incomplete" in capsys.readouterr().err
    out.write_text('{"id": 0}\n{"id": 0}\n')
    with pytest.raises(sample.SampleError, match="o.jsonl:2: id 0 repeats line 1"):
        read_done_ids(str(out))
    out.write_text('{"id": 0}\nnot json\n')
    with pytest.raises(sample.SampleError, match="o.jsonl:2: not a record"):
        read_done_ids(str(out))


def test_read_done_ids_streams_the_output(tmp_path):
    import tracemalloc

    out = tmp_path / "o.jsonl"
    pad = "x" * 100_000
    with open(out, "w") as f:
        f.writelines(json.dumps({"id": i, "text": pad}) + "\n" for i in range(300))
        f.write('{"id": 300, "te')
    tracemalloc.start()
    try:
        assert read_done_ids(str(out)) == set(range(300))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000, f"{peak} bytes held for a {out.stat().st_size}-byte output"
    assert out.read_bytes().endswith(b'"}\n') and read_done_ids(str(out)) == set(range(300))


def test_reading_back_a_long_runs_output_reports_progress(tmp_path):
    """A restart read an output of ~100 GB (~10 KB a record) for minutes without a line."""
    out = tmp_path / "o.jsonl"
    with open(out, "w") as f:  # lines of 1 KiB, 3 MiB
        f.writelines(json.dumps({"id": i, "text": "x" * (1023 - len(json.dumps({"id": i, "text": ""})))}) + "\n"
                     for i in range(3 * 1024))
    shown = []
    assert read_done_ids(str(out), shown.append, 0) == set(range(3 * 1024))  # every look at the clock
    line = re.compile(rf"reading {re.escape(str(out))}: (\d)/3 MiB \| \S+ MiB/s( \| eta \d+m\d\ds)?")
    assert [int(line.fullmatch(s).group(1)) for s in shown] == [1, 2, 3], shown  # at lines 1024, 2048, 3072
    assert all(" | eta " in s for s in shown)


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
        failures = _records(str(out) + ".failures.jsonl")
        assert sorted(f["id"] for f in failures) == [0, 1, 2, 3]
        assert all("empty completion" in f["reason"] for f in failures)
        assert "4 prompts failed" in err and "empty completion x" in err
        srv.models["silent"] = srv.models["mute"] = "ok"  # the next run retries them
        assert sample.main(argv) == 0
    assert sorted(_by_id(_records(out))) == [0, 1, 2, 3]


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
    assert [r["truncated_loops"] for r in _records(out)] == [["rejected"]]
    assert line.endswith(" 0 prompts failed, 1 loop truncated"), line
    out = tmp_path / "fail.jsonl"
    line = run({"base-a": "ok", "silent": "empty"}, out)
    assert line.endswith(f" 1 prompt failed (listed in {out}.failures.jsonl; a rerun retries it), 0 loops "
                         f"truncated"), line


@pytest.mark.parametrize("name, content", [("c.txt", "first doc\nsecond \ufeff doc\n"),
                                           ("c.jsonl", '{"text": "first doc"}\n{"text": "second \ufeff doc"}\n')])
def test_a_bom_opening_a_corpus_file_is_not_text(tmp_path, name, content):
    from polar.prompt_sources import TextSource

    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))
    src = TextSource([str(path)], "auto", "text")
    try:
        assert len(src) == 2
        assert src.get(0) == ("first doc", f"{path}:1")
        assert src.get(1)[0] == "second \ufeff doc"  # inside a text it is the text's own character
    finally:
        src.close()


def test_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--corpus", "--pool", "--instruction-share", "--top-k", "--max-tokens", "--endpoint-max-failures",
                 "--max-records", "--tokenizer"):
        assert flag in out
    # defaults that say something, once: not "(default: OUTPUT.failures.jsonl) (default: None)"
    flat = " ".join(out.split())
    assert "(default: None)" not in flat and "(default: False)" not in flat, out
    assert "(default: 64)" in flat and "(default: OUTPUT.failures.jsonl)" in flat


def test_unknown_tokenizer_is_a_clear_error(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("doc\n")
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump([{"model": m, "base_url": "http://127.0.0.1:9/v1"} for m in "ab"]))
    rc = sample.main(["--corpus", str(corpus), "--pool", str(pool), "--output", str(tmp_path / "o.jsonl"),
                      "--num-prompts", "1", "--tokenizer", str(tmp_path / "no-such-tokenizer")])
    err = capsys.readouterr().err
    assert rc == 2 and "--tokenizer" in err and "no-such-tokenizer" in err, err


def _minimal_argv(tmp_path, srv_url, *extra, models=("a", "b")):
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump([{"model": m, "base_url": srv_url} for m in models]))
    corpus = tmp_path / "c.txt"
    corpus.write_text("one document\nanother document\n")
    return ["--corpus", str(corpus), "--pool", str(pool), "--num-prompts", "2", "--retry-base", "0.001",
            "--retry-cap", "0.01", "--max-retries", "1", *extra]


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_progress_interval_that_is_not_positive_is_refused(tmp_path, capsys, value):
    # 0 printed a progress line on every turn of the event loop: tens of thousands a second
    argv = _minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o.jsonl"),
                         "--progress-interval", value)
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2
    assert f"--progress-interval must be > 0 seconds, got {float(value)}" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,expected", [
    ("--temperature", "nan", "--temperature must be a finite number, got nan"),  # was sent as NaN, no JSON
    ("--retry-cap", "nan", "--retry-cap must be a finite number, got nan"),  # was a retry without a wait
    ("--retry-base", "inf", "--retry-base must be a finite number, got inf"),
    ("--request-timeout", "inf", "--request-timeout must be a finite number, got inf"),  # was a traceback
    ("--request-timeout", "1e12", "--request-timeout must be at most 1e+09 seconds, got 1e+12"),
    # one copy is no loop: truncate_loop read past the text's start, an IndexError at the first completion
    ("--loop-min-repeats", "1", "--loop-min-repeats must be at least 2, got 1"),
    # one message named five options, leaving the reader to find the wrong one
    ("--max-retries", "-1", "--max-retries must be >= 0, got -1"),
    ("--loop-min-chars", "-2", "--loop-min-chars must be >= 0, got -2"),
    ("--request-timeout", "0", "--request-timeout must be > 0 seconds, got 0.0")])
def test_an_option_that_no_request_could_use_is_refused(tmp_path, capsys, flag, value, expected):
    argv = _minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o.jsonl"), flag, value)
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_failures_naming_the_output_or_its_settings_record_is_refused(tmp_path, capsys):
    """The run empties its failures file at its start: --failures OUTPUT emptied the records of the
    earlier runs, and the summary still said the output held them."""
    out = tmp_path / "o.jsonl"
    with FakeOpenAIServer({"a": "ok", "b": "ok"}) as srv:
        argv = _minimal_argv(tmp_path, srv.base_url, "--output", str(out))
        assert sample.main(argv) == 0, capsys.readouterr().err
        kept, settings = out.read_bytes(), (tmp_path / "o.jsonl.run.json").read_bytes()
        for path, what in ((out, "the output"), (tmp_path / "o.jsonl.run.json", "the output's settings record")):
            given = os.path.join(str(tmp_path), ".", path.name)  # another spelling of the same file
            with pytest.raises(SystemExit) as e:
                sample.main(argv + ["--num-prompts", "3", "--failures", given])
            assert e.value.code == 2
            assert f"--failures {given} is {path}, {what}: a run empties its failures file" in capsys.readouterr().err
    assert out.read_bytes() == kept and len(_records(out)) == 2
    assert (tmp_path / "o.jsonl.run.json").read_bytes() == settings


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
    argv = _minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o.jsonl"))
    argv += [flag, str(tmp_path / "d")]
    assert sample.main(argv) == 2
    assert f"{flag} {tmp_path / 'd'}: is a directory" in capsys.readouterr().err


def test_the_failures_file_gets_its_directory_and_an_unwritable_place_is_a_clear_error(tmp_path, capsys):
    with FakeOpenAIServer({"a": "ok", "b": "ok"}) as srv:
        argv = _minimal_argv(tmp_path, srv.base_url, "--output", str(tmp_path / "o.jsonl"))
        failures = tmp_path / "logs" / "failures.jsonl"  # its directory was not made: a traceback
        assert sample.main(argv + ["--failures", str(failures)]) == 0, capsys.readouterr().err
    assert failures.exists() and len(_records(tmp_path / "o.jsonl")) == 2
    (tmp_path / "f").write_text("")
    for flag in ("--output", "--failures"):
        argv = _minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o2.jsonl"))
        assert sample.main(argv + [flag, str(tmp_path / "f" / "x.jsonl")]) == 2
        assert f"{flag} {tmp_path / 'f' / 'x.jsonl'}: {tmp_path / 'f'} is a file, not a directory" \
            in capsys.readouterr().err
    # a place no file can be made (as a read-only mount, a directory without write permission, which
    # root, running the tests here, would write anyway): a traceback at the lock or at the run's start
    for flag, expected in (("--output", "/proc/x.jsonl: cannot write the output: "),
                           ("--failures", "--failures /proc/x.jsonl: cannot write: ")):
        argv = _minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o3.jsonl"))
        assert sample.main(argv + [flag, "/proc/x.jsonl"]) == 2
        assert expected in capsys.readouterr().err


def test_a_completion_holding_a_lone_surrogate_is_a_failure_retried_by_the_next_run(tmp_path, capsys):
    """Such a record is one every build rejects (records.py): like an empty completion, the prompt
    is listed as failed and sampled again, instead of being marked done and lost at build time."""
    with FakeOpenAIServer({"a": "ok", "b": "surrogate"}) as srv:
        argv = _minimal_argv(tmp_path, srv.base_url, "--output", str(tmp_path / "o.jsonl"))
        assert sample.main(argv) == 1
        assert (tmp_path / "o.jsonl").read_text() == ""
        failures = _records(str(tmp_path / "o.jsonl") + ".failures.jsonl")
        assert sorted(f["id"] for f in failures) == [0, 1]
        assert all("lone surrogate" in f["reason"] for f in failures)
        err = capsys.readouterr().err
        assert "invalid text x" in err and "DOWN" not in err, err  # counted, and not the endpoint's fault
        srv.models["b"] = "ok"
        assert sample.main(argv) == 0
    assert sorted(_by_id(_records(tmp_path / "o.jsonl"))) == [0, 1]


def test_a_pool_under_a_policies_key_may_sit_beside_other_settings(tmp_path):
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"policies": [{"model": m, "base_url": "http://h:1/v1"} for m in "ab"],
                                    "notes": "sampling run 3"}))
    assert [p.name for p in load_pool(str(pool))] == ["a", "b"]


def test_an_instruction_share_without_instruction_prompts_is_refused(tmp_path, capsys):
    # it was ignored without a word: every prompt came from the corpus
    argv = _minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o.jsonl"),
                         "--instruction-share", "0.5")
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2
    assert "--instruction-share 0.5 needs --instruction-prompts" in capsys.readouterr().err


@pytest.mark.parametrize("flag,name", [("--corpus", "o.jsonl"), ("--instruction-prompts", "o.jsonl.failures.jsonl")])
def test_a_prompt_file_that_this_run_writes_is_refused(tmp_path, capsys, flag, name):
    """`--corpus data/*.jsonl --output data/o.jsonl`: a rerun's glob took the output in as prompts."""
    (tmp_path / name).write_text('{"id": 0}\n')
    argv = _minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o.jsonl"))
    if flag == "--corpus":  # the corpus file and, spelt otherwise, the output
        argv.insert(2, str(tmp_path / "." / name))
    else:
        argv += [flag, str(tmp_path / name)]
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2
    assert f"{flag} names " in capsys.readouterr().err
