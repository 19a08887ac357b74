"""`polar serve`: a reward server for reinforcement fine-tuning (RFT) reward calls.

    items.py       the one place where request items become token ids (POLAR's input format)
    grouping.py    items -> shared-prefix groups (longest common id prefix), so each prefix is computed once
    model.py       an engine checkpoint -> fp32 rewards of packed batches (TP across local devices)
    batcher.py     cross-request batching: a bounded queue, max-wait, token-budgeted forward passes
    validation.py  request bodies -> items, or a 4xx message saying what is wrong
    metrics.py     Prometheus metrics
    app.py         the HTTP endpoints (SGLang /classify, vLLM/lmdeploy /pooling, OpenRLHF /get_reward,
                   native /v1/rewards, /health, /metrics)
    server.py      `polar serve` command line
"""
