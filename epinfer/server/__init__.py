"""`epinfer serve`: an OpenAI-compatible HTTP server in front of the DP × TP engine.

  main.py         the process: starts the ranks, runs uvicorn, SIGTERM drain, exit codes
  app.py          FastAPI routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics
  protocol.py     request validation (→ 400 with an OpenAI error body) and response bodies
  text.py         incremental detokenization for streams, stop-string hold-back, logprob records
  client.py       the server side of the engine: request streams, rank monitor, queue limit
  metrics.py      Prometheus text exposition
  engine_loop.py  the rank side: the lockstep serving loop with routing and cancellation
"""
