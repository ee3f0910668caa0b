"""The hand-written contenders: one small standalone program each.

Each reads the JSON wine records of `--input` from the beginning of every partition (like
waxserve, without a consumer group, except Quix Streams, which cannot) and writes one
output message per record to `--output`: `{"record_id", "event_time_ms", "score"}` as
JSON (the passthrough copies the input bytes instead; `essential` writes waxserve's
`ScoredRecord`, with waxserve's own codec and encoder). `--stop-after N` makes it exit once
N records are written (throughput runs); without it, it runs until SIGINT/SIGTERM (latency
runs). Only `common` is shared, and it only holds what is not part of the work measured:
arguments, client settings, signal handling.
"""
