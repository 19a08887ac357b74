"""The reward tokens a conversion adds to the tokenizer start at the mean embedding (and LM head) row
of the source tokenizer's tokens, as the README says, also where the model's table already has rows
for their ids: such rows (Qwen2 pads its vocabulary past the tokenizer) belong to no token the model
was trained on."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="pip install transformers safetensors")

from polar.convert import engine_to_hf, hf_to_engine  # noqa: E402
from polar.convert.tokenizer_files import load as load_tokenizer  # noqa: E402
from tests.polar.convert import tiny_models as tm  # noqa: E402


@pytest.mark.parametrize("model_vocab", [64, 60, 59], ids=["padded_table", "one_spare_row", "no_spare_row"])
def test_added_reward_tokens_start_at_the_mean_row(tmp_path, model_vocab):
    import transformers
    from safetensors.torch import load_file

    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(tm.llama_config("llama", vocab=model_vocab)).float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    src = tm.save(ref, tmp_path / "src", with_reward_tokens=False)  # 59 tokens: ids 59, 60 are added
    dst = hf_to_engine.convert(src, tmp_path / "engine", log=lambda *a: None)
    tok = load_tokenizer(dst / "tokenizer")
    assert (tok.reward_sep_id, tok.reward_token_id) == (59, 60)
    out = load_file(str(engine_to_hf.convert(dst, tmp_path / "hf", log=lambda *a: None) / "model.safetensors"))
    emb, src_emb = out["model.embed_tokens.weight"], ref.model.embed_tokens.weight.detach()
    assert emb.shape[0] == max(model_vocab, 61)
    torch.testing.assert_close(emb[59:61], src_emb[:59].mean(0, keepdim=True).expand(2, -1), rtol=0, atol=1e-6)
    assert torch.equal(emb[:59], src_emb[:59])
    assert torch.equal(emb[61:], src_emb[61:])  # the rows no token uses are left as they were
