"""An Open Inference Protocol (KServe v2 / Triton) gRPC model server for demos and tests.

Run it from the repository root::

    python -m examples.model_server --port 8001

It serves `inference.GRPCInferenceService` (tritonclient works unchanged), gRPC health
(NOT_SERVING while the models load, then SERVING) and server reflection.

Models. In gpufleet the model name is the deployment name, so any name is accepted; the name
picks one of two behaviours ("kinds"):

- `echo`: every input `INPUT<suffix>` comes back as `OUTPUT<suffix>` with the same datatype,
  shape and bytes, raw or typed as it was sent.
- `tokens`: a decoupled token generator. Input `PROMPT` (BYTES, one element) and optional
  `MAX_TOKENS` (INT32, one element); output `TOKEN` (BYTES). The tokens are the prompt's
  whitespace-separated words, repeated in order until MAX_TOKENS (default: one pass). On
  ModelStreamInfer every token is its own response and the last one carries the parameter
  `triton_final_response: true`, as Triton does; on ModelInfer all tokens come at once.

Name -> kind: the names `echo` and `tokens` map to their kinds; `--model NAME=KIND` adds or
overrides a name; every other name gets `--default-model-kind` (`echo` unless set; `none`
makes unknown names NOT_FOUND).

Start-up report: once loaded, the server writes `model server ready after X.XXX s` (process
start to SERVING) to stderr and, when `GPUFLEET_READY_FILE` is set, `{"ready_seconds": X}` to
that file. `model server listening on HOST:PORT` goes to stdout as soon as the port is bound
(use `--port 0` plus this line or `--port-file` to learn the port).
"""
