"""The Kafka-client ceiling: kafka-python producing the benchmark's command JSON as fast as it can
(acks=all, idempotent, linger 5 ms), no HTTP, no journal. Prints one JSON line with its figures."""

from __future__ import annotations

import json
import sys
import time

from kafka import KafkaProducer

BODY = (
    '{{"request_id":"raw-{n}","device_id":"device_{d:03d}","command_type":"config_update",'
    '"payload":{{"measurement_interval":600}},"protocol":"coap","parser_script_ref":"efento_bidirectional_parser.py",'
    '"metadata":{{}},"timestamp":"2026-11-29T00:00:00Z","expires_at":null}}'
)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(bootstrap: str, topic: str, count: int) -> None:
    """Send `count` records and wait for every acknowledgement."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    producer.send(topic, key=b"warm-up", value=b"{}").get(timeout=30)
    values = [(f"device_{n % 1000:03d}".encode(), BODY.format(n=n, d=n % 1000).encode()) for n in range(count)]
    cpu = time.process_time()
    started = time.perf_counter()
    for key, value in values:
        producer.send(topic, key=key, value=value)
    producer.flush()
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    producer.close()
    figures = {"messages": count, "seconds": seconds, "rate": count / seconds, "cpu": cpu / seconds}
    print(json.dumps({**figures, "rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
