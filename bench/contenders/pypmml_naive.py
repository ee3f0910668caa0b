"""The naive PMML path: pypmml with its default Py4J gateway (a JVM in a child process),
one `predict` call per record, json in and out.

    python -m bench.contenders.pypmml_naive --brokers B --input T --output O --model M.pmml \\
        [--stop-after N]
"""

from __future__ import annotations

import json

from confluent_kafka import Consumer, Producer
from pypmml import Model

from bench.contenders import common
from dataflows.contracts.files import load_contract
from dataflows.core.descriptors import catalog_contracts


def main() -> None:
    """Score record by record through Py4J."""
    args = common.parse_args(__doc__)
    common.stop_on_sigterm()
    model = Model.load(args.model)
    # PMML names its inputs "fixed acidity", "pH": map them onto the record's fields as the
    # wine contract does (by canonical name).
    contract = load_contract(catalog_contracts()["wine"])
    inputs = {}
    for field in model.inputFields:
        found = contract.field_for(field.name)
        if found is None:
            raise SystemExit(f"PMML input {field.name!r} is not a field of the wine contract")
        inputs[field.name] = found.name
    output = model.outputFields[0].name
    consumer = Consumer(common.consumer_config(args.brokers))
    common.assign_from_beginning(consumer, args.input)
    producer = Producer(common.producer_config(args.brokers))
    written = 0
    try:
        while not common.done(written, args.stop_after):
            msg = consumer.poll(0.1)
            value = msg.value() if msg is not None and msg.error() is None else None
            if msg is None or value is None:
                continue
            record = json.loads(value)
            result = model.predict({name: record[field] for name, field in inputs.items()})
            out = {
                "record_id": record["record_id"],
                "event_time_ms": record["event_time_ms"],
                "score": float(result[output]),
            }
            common.produce(producer, args.output, msg.key(), json.dumps(out).encode())
            producer.poll(0)
            written += 1
    except KeyboardInterrupt:
        pass
    finally:
        producer.flush(30)
        consumer.close()
        model.close()


if __name__ == "__main__":
    main()
