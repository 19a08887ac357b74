"""The exported tokenizer serves the ids the engine scores: BOS first, once, through transformers'
own encoding (what vLLM and SGLang run on the serving string), whatever the source's post-processor."""
from __future__ import annotations

import json

import pytest

from polar.client_format import client_encode
from polar.convert import engine_to_hf, hf_to_engine
from polar.convert.tokenizer_files import load

from . import tiny_models as tm


@pytest.mark.parametrize("source_template,family", [(False, "llama"), (True, "llama"), (False, "qwen2")],
                         ids=["no_template", "template", "qkv_biases"])
def test_transformers_encodes_the_serving_string_as_the_engine_does(tmp_path, source_template, family):
    """qkv_biases: transformers 5 builds a config of model_type qwen2 its own Qwen2Tokenizer, which keeps
    only the vocabulary, merges and post-processor of tokenizer.json (Qwen2's NFC normalizer and
    pre-tokenizer replace the file's): the export is model_type llama whatever the biases."""
    import transformers

    src = tm.save(tm.random_seq_cls(tm.llama_config(family)), tmp_path / "src")
    if source_template:  # Llama's tokenizer adds BOS itself: the export must not add a second one
        tree = json.loads((src / "tokenizer.json").read_text())
        tree["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                           {"Sequence": {"id": "A", "type_id": 0}}],
                                  "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                                  "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
        (src / "tokenizer.json").write_text(json.dumps(tree))
    hf_to_engine.convert(src, tmp_path / "engine")
    engine_to_hf.convert(tmp_path / "engine", tmp_path / "hf")
    served = client_encode(load(tmp_path / "hf"), "w1 w2", "w3 w4", "w5 w6")
    assert served.ids[0] == 1 and served.ids[1] != 1
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf(served.text)["input_ids"] == served.ids.tolist()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
