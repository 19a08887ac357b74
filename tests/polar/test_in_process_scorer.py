"""The in-process scorer's start-up checks: what `polar serve` refuses before serving, it refuses
before scoring."""
import json

import pytest

SPECIALS = ["<unk>", "<s>", "</s>", "<|reward|>", "[UNUSED_TOKEN_130]"]


def _word_tokenizer(path, words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from polar.tokenizer import HFTokenizer

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "pad_token": "</s>"}))
    return HFTokenizer(path, bos="<s>", pad="</s>")


def test_a_tokenizer_with_more_ids_than_the_model_is_refused(tmp_path):
    """It was taken, and an item holding an id past the model's vocabulary failed its round with
    IndexError('index out of range in self') (on a GPU, a device-side assert in the trainer's own
    CUDA context); `polar serve` refuses such a tokenizer at start-up."""
    from engine.inference import RewardScorer
    from polar.in_process_scorer import InProcessScorer

    scorer = RewardScorer.random(dict(num_layers=1, hidden_size=32, num_attention_heads=2, num_query_groups=1,
                                      ffn_hidden_size=64, vocab_size=64, max_position_embeddings=128),
                                 attention_backend="torch")
    with pytest.raises(ValueError, match="the tokenizer has 105 ids, the model's vocabulary only 64"):
        InProcessScorer(scorer, _word_tokenizer(tmp_path / "big", 100))
    fits = InProcessScorer(scorer, _word_tokenizer(tmp_path / "fits", 50))
    try:
        assert len(fits.score([{"prompt": "w1 w2", "reference": "w3", "output": "w49"}])) == 1
    finally:
        fits.close()
