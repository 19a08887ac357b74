"""polar sample's command line (polar/sample_args.py): its help, and options no run could use, refused
before any file is read."""
import os

import pytest

from polar import sample
from tests.polar.openai_server import FakeOpenAIServer
from tests.polar.sample_helpers import jsonl_records, minimal_argv


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


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_progress_interval_that_is_not_positive_is_refused(tmp_path, capsys, value):
    # 0 printed a progress line on every turn of the event loop: tens of thousands a second
    argv = minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o.jsonl"),
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
    argv = minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o.jsonl"), flag, value)
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
        argv = minimal_argv(tmp_path, srv.base_url, "--output", str(out))
        assert sample.main(argv) == 0, capsys.readouterr().err
        kept, settings = out.read_bytes(), (tmp_path / "o.jsonl.run.json").read_bytes()
        for path, what in ((out, "the output"), (tmp_path / "o.jsonl.run.json", "the output's settings record")):
            given = os.path.join(str(tmp_path), ".", path.name)  # another spelling of the same file
            with pytest.raises(SystemExit) as e:
                sample.main(argv + ["--num-prompts", "3", "--failures", given])
            assert e.value.code == 2
            assert f"--failures {given} is {path}, {what}: a run empties its failures file" in capsys.readouterr().err
    assert out.read_bytes() == kept and len(jsonl_records(out)) == 2
    assert (tmp_path / "o.jsonl.run.json").read_bytes() == settings


def test_an_instruction_share_without_instruction_prompts_is_refused(tmp_path, capsys):
    # it was ignored without a word: every prompt came from the corpus
    argv = minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o.jsonl"),
                         "--instruction-share", "0.5")
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2
    assert "--instruction-share 0.5 needs --instruction-prompts" in capsys.readouterr().err


@pytest.mark.parametrize("flag,name", [("--corpus", "o.jsonl"), ("--instruction-prompts", "o.jsonl.failures.jsonl")])
def test_a_prompt_file_that_this_run_writes_is_refused(tmp_path, capsys, flag, name):
    """`--corpus data/*.jsonl --output data/o.jsonl`: a rerun's glob took the output in as prompts."""
    (tmp_path / name).write_text('{"id": 0}\n')
    argv = minimal_argv(tmp_path, "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o.jsonl"))
    if flag == "--corpus":  # the corpus file and, spelt otherwise, the output
        argv.insert(2, str(tmp_path / "." / name))
    else:
        argv += [flag, str(tmp_path / name)]
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2
    assert f"{flag} names " in capsys.readouterr().err
