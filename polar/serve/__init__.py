"""`polar serve`: a reward server for reinforcement fine-tuning (RFT) reward calls.

    items.py       the one place where request items become token ids (POLAR's input format)
    grouping.py    items -> shared-prefix groups (longest common id prefix), so each prefix is computed once
    batcher.py     cross-request batching: a bounded queue, max-wait, token-budgeted forward passes (the model
                   itself is engine.inference.RewardScorer: fp32 rewards of packed batches, TP/PP across devices)
    admission.py   how many requests are read, parsed and tokenized at once, and in what order
    client_watch.py  a request whose client has left is not queued, leaves the queue, or is skipped
    validation.py  request bodies -> items, or a 4xx message saying what is wrong
    metrics.py     Prometheus metrics
    app.py         the HTTP endpoints (SGLang /classify, vLLM/lmdeploy /pooling, OpenRLHF /get_reward,
                   native /v1/rewards, /health, /metrics)
    http_protocol.py  uvicorn's HTTP/1.1 protocol as polar serve runs it: head deadline, JSON errors, lingering close
    listen_socket.py  rank 0's listening socket (bound before the model loads) and the open-files limit
    server.py      `polar serve` command line: the model load, rank 0's service, the followers
"""
