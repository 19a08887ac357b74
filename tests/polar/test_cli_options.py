"""Every polar command names the option meant for a misspelt one (README, Notes: `polar pretrain --confg x`:
`unrecognized arguments: --confg (did you mean --config?)`); only pretrain and finetune did, the other
commands named the word alone. Run in process: each refuses at its parse, before it reads or loads anything."""
import pytest

from polar.cli import main

MISSPELT = [  # (the command line, the option meant)
    (["data", "build", "r.jsonl", "--output", "ds", "--seq-lenght", "5"], "--seq-length"),
    (["data", "scan", "r.jsonl", "--output", "scan", "--nm-parts", "2"], "--num-parts"),
    (["data", "stats", "ds", "--jsn"], "--json"),
    (["data", "synthetic", "triplets", "-o", "t.jsonl", "--sed", "2"], "--seed"),
    (["plan", "--gpuss", "4"], "--gpus"),
    (["hparams", "--preset", "polar_7b", "--base-tokens-billions", "1", "--rm-tokens-billions", "1", "--datset", "d"],
     "--dataset"),
    (["serve", "--checkpoint", "run", "--prot", "8000"], "--port"),
    (["sample", "--corpus", "c.txt", "--pool", "p.yaml", "--num-prompts", "3", "--output", "o.jsonl",
      "--concurency", "3"], "--concurrency"),
    (["format", "--tokenizer", "byte", "--input", "i.jsonl", "--output", "o.jsonl", "--max-lenght", "9"],
     "--max-length"),
    (["score", "--checkpoint", "run", "--input", "i.jsonl", "--output", "o.jsonl", "--chunk-linez", "5"],
     "--chunk-lines"),
    (["eval", "--checkpoint", "run", "--input", "r.jsonl", "--jsn", "x"], "--json"),
    (["convert", "hf-to-engine", "src", "dst", "--tpp", "2"], "--tp"),
    (["convert", "engine-to-hf", "src", "dst", "--formt", "hf"], "--format"),
]


@pytest.mark.parametrize("argv,meant", MISSPELT, ids=[" ".join(a[:2]) for a, _ in MISSPELT])
def test_a_misspelt_option_is_named_with_the_one_meant(argv, meant, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of the command line exists: the parse refuses first
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    wrong = [w for w in argv if w.startswith("--")][-1]
    assert f"unrecognized arguments: {wrong} (did you mean {meant}?)" in err, err
    assert not list(tmp_path.iterdir())
