"""The Kafka floor: batched consume -> produce of the same bytes, no decoding, no scoring.

python -m bench.contenders.passthrough --brokers B --input T --output O [--stop-after N]
"""

from __future__ import annotations

from confluent_kafka import Consumer, Producer

from bench.contenders import common


def main() -> None:
    """Copy every input message to the output topic."""
    args = common.parse_args(__doc__, model=False)
    common.stop_on_sigterm()
    consumer = Consumer(common.consumer_config(args.brokers))
    common.assign_from_beginning(consumer, args.input)
    producer = Producer(common.producer_config(args.brokers))
    written = 0
    try:
        while not common.done(written, args.stop_after):
            for msg in consumer.consume(common.BATCH, common.CONSUME_TIMEOUT_S):
                if msg.error() is None:
                    common.produce(producer, args.output, msg.key(), msg.value())
                    written += 1
            producer.poll(0)
    except KeyboardInterrupt:
        pass
    finally:
        producer.flush(30)
        consumer.close()


if __name__ == "__main__":
    main()
