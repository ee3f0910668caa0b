"""Where records come from and where output goes: the Kafka sources and sinks."""
