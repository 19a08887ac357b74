"""Helpers shared by the tests of `polar sample` (tests/polar/test_sample*.py)."""
import json

import yaml


def jsonl_records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def minimal_argv(tmp_path, srv_url, *extra, models=("a", "b")):
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump([{"model": m, "base_url": srv_url} for m in models]))
    corpus = tmp_path / "c.txt"
    corpus.write_text("one document\nanother document\n")
    return ["--corpus", str(corpus), "--pool", str(pool), "--num-prompts", "2", "--retry-base", "0.001",
            "--retry-cap", "0.01", "--max-retries", "1", *extra]
