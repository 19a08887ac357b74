"""Checkpoint conversion between transformers checkpoints and the engine's (`polar convert ...`).

    hf_to_engine   a transformers checkpoint (Llama, Mistral, Qwen2, InternLM2, InternLM2ForRewardModel;
                   safetensors or GGUF) -> an engine checkpoint with its model.yaml and tokenizer
    engine_to_hf   an engine checkpoint -> Llama/Qwen2ForSequenceClassification or POLAR's
                   InternLM2ForRewardModel layout
"""
