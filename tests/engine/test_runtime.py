import pytest

from engine.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from engine.runtime import validate_layout


@pytest.mark.parametrize("hidden,heads", [(30, 2), (96, 32)])
def test_an_odd_head_dimension_is_refused_at_start_up(hidden, heads):
    """Rotary embeddings rotate channel pairs: an odd head dimension used to fail in the first
    forward pass with a tensor-size mismatch; it is refused before any process builds a model."""
    model = ModelConfig(hidden_size=hidden, num_attention_heads=heads, num_query_groups=heads)
    with pytest.raises(ConfigError, match=rf"model.hidden_size={hidden} / model.num_attention_heads={heads}"):
        validate_layout(model, ParallelConfig(), TrainConfig(), 1, 1024)
    validate_layout(ModelConfig(hidden_size=hidden + heads, num_attention_heads=heads, num_query_groups=heads),
                    ParallelConfig(), TrainConfig(), 1, 1024)
