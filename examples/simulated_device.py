"""A simulated MQTT device (or several) to try the reference connector with.

    python examples/simulated_device.py --received received.jsonl device_001 device_002

Each device subscribes to `devices/{device_id}/commands`, appends every message it receives to the JSONL file
given by --received (one line per message, repeats included), and answers on `devices/{device_id}/responses`:
`{"request_id": …, "ok": true, "result": {"applied": <payload>}}`. A command whose command_type is "fail"
is answered `{"request_id": …, "ok": false, "error": "simulated failure", "result": {"refused": <payload>}}`.
It keeps a persistent session (clean_session false, client id from --client-id), so the MQTT broker holds
commands published while it is offline. It prints "ready" once subscribed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

FAILING_COMMAND_TYPE = "fail"


def answer(command: dict[str, Any]) -> dict[str, Any]:
    """What the device answers to a command: success, unless its command_type asks for a failure."""
    if command.get("command_type") == FAILING_COMMAND_TYPE:
        return {
            "request_id": command.get("request_id"),
            "ok": False,
            "error": "simulated failure",
            "result": {"refused": command.get("payload")},
        }
    return {"request_id": command.get("request_id"), "ok": True, "result": {"applied": command.get("payload")}}


class Devices:
    """One MQTT connection serving every simulated device id."""

    def __init__(self, device_ids: list[str], received: Path, client_id: str) -> None:
        self.received = received
        self.device_of_topic = {f"devices/{device_id}/commands": device_id for device_id in device_ids}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: print("ready", flush=True)
        self.client.on_message = self._on_message

    def run(self, host: str, port: int) -> None:
        """Serve until disconnected (SIGTERM or SIGINT)."""
        self.client.connect(host, port, keepalive=30)
        self.client.loop_forever()

    def _on_connect(self, client: mqtt.Client, _userdata, _flags, reason_code, _properties) -> None:
        if not reason_code.is_failure:
            client.subscribe([(topic, 1) for topic in self.device_of_topic])

    def _on_message(self, client: mqtt.Client, _userdata, message: mqtt.MQTTMessage) -> None:
        device_id = self.device_of_topic[message.topic]
        try:
            command = json.loads(message.payload)
        except ValueError:
            command = {"unreadable": message.payload.decode(errors="replace")}
        line = {"device_id": device_id, "topic": message.topic, "qos": message.qos, "retain": message.retain}
        with self.received.open("a") as received:
            received.write(json.dumps({**line, "command": command}) + "\n")
        if isinstance(command, dict) and "request_id" in command:
            client.publish(f"devices/{device_id}/responses", json.dumps(answer(command)), qos=1)


def main(argv: list[str] | None = None) -> int:
    """Run the simulated devices until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("device_ids", nargs="+", metavar="DEVICE_ID")
    parser.add_argument("--received", type=Path, required=True, help="JSONL file of every message received")
    parser.add_argument("--client-id", help="MQTT client id (default: simulated-<first device id>)")
    parser.add_argument("--mqtt-host", default=os.environ.get("MQTT_HOST", "localhost"))
    parser.add_argument("--mqtt-port", type=int, default=int(os.environ.get("MQTT_PORT", "1883")))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    devices = Devices(args.device_ids, args.received, args.client_id or f"simulated-{args.device_ids[0]}")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: devices.client.disconnect())
    devices.run(args.mqtt_host, args.mqtt_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
