"""The benchmark harness of issue 5: `python -m bench` (`just bench`), `python -m bench soak`.

`bench.harness` starts a broker (Apache Kafka by default, tansu with `--broker tansu`),
writes the input topics, runs every contender
(`bench.contenders.*`, one process at a time) and measures it; `bench.report` writes the
JSON, markdown and PNG report. `bench/README.md` describes the method.
"""
