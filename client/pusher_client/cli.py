"""`pusher`: send commands and read their status from a shell. Prints JSON, one object per line."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import IO, Any, get_args

import msgspec

from pusher_client import (
    STAGES,
    CommandFailed,
    Forbidden,
    NotFound,
    PusherClient,
    PusherClientError,
    RateLimited,
    RetryPolicy,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)
from pusher_client.wire import TERMINAL, VERSION, FanoutStatus, Status

OK, FAILED, USAGE, DENIED, NOT_FOUND, UNAVAILABLE, TIMED_OUT = 0, 1, 2, 3, 4, 5, 6

EPILOG = """\
environment:
  PUSHER_URL           the service (default http://127.0.0.1:8000; https://… for HTTPS)
  PUSHER_API_KEY       the API key (better here than in --api-key, which other users can see in ps)
  PUSHER_CA_FILE       HTTPS: the CA that signed the service's certificate (default: the system's CAs)
  PUSHER_CLIENT_CERT   HTTPS: this client's certificate (PEM), for a service that requires one
  PUSHER_CLIENT_KEY    its private key, when not in the same file

examples:
  pusher send --device efento_device_001 --type config_update --protocol coap \\
              --payload '{"measurement_interval": 600}' --parser-script-ref efento_bidirectional_parser.py
  pusher send --device mqtt_device_001 --type set_led --protocol mqtt --payload '{"state": "on"}' \\
              --metadata '{"topic": "devices/mqtt_device_001/commands"}' --wait
  pusher batch commands.jsonl --idempotency-key nightly-2026-11-29
                                       one command per line (`-`: standard input); the key makes a rerun safe
  pusher status 3f2c9a1e-…             add --wait to block until it is published
  pusher status 3f2c9a1e-… --wait --until succeeded --timeout 60
                                       until the device answered (needs the service's status topic)
  pusher list --device efento_device_001 --status accepted
  pusher send --device thermostat_7 --type set_temperature --protocol mqtt --payload '{"setpoint": 21}' \
              --coalesce-key setpoint      latest wins: replaces a setpoint of this device still waiting
  pusher send --device gw_3 --type reboot --protocol coap --not-before 2026-12-03T02:00:00Z
                                       held in the journal until then
  pusher fanout --devices-file fleet.txt --type reboot --protocol coap --wait
                                       one command to every device listed (one id per line)
  pusher fanout-status 9b1d…           how many of its commands are in each status
  pusher cancel 3f2c9a1e-…             never sent, if it was still waiting

exit codes:
  0  done: accepted (202) or published (200); for batch, every line
  1  refused or failed: invalid command (4xx), Kafka refused it, ended failed/rejected/expired (or cancelled,
     superseded); for batch, any line; for fanout --wait, any of its commands; cancel: too late (409)
  2  usage: bad arguments or JSON given on the command line
  3  the API key is missing, unknown, or not allowed to do this (401/403)
  4  no such command (status, cancel) or fan-out (fanout-status)
  5  the service did not answer, or stayed unavailable / rate limited until --retry-for ran out, or TLS refused
     the connection (the service's certificate does not verify against --ca-file)
  6  --wait: the command did not reach the stage within --timeout (it is still queued; nothing is lost)
"""


def main(argv: list[str] | None = None) -> int:
    """Run one `pusher` command; returns the exit code."""
    try:
        return _run(argv)
    except BrokenPipeError:  # the reader left early (`pusher list | head`): stop quietly, as a filter does
        _discard_stdout()
        return OK


def _run(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        fields = _command_fields(args) if args.action == "send" else {}
        if args.action == "fanout":
            fields = _fanout_fields(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.action == "batch" and args.chunk_size < 1:
        parser.error("--chunk-size must be at least 1")
    retry = RetryPolicy(attempts=1_000_000, deadline=args.retry_for)  # --retry-for alone bounds it
    certfile = args.client_cert or os.environ.get("PUSHER_CLIENT_CERT")
    keyfile = args.client_key or os.environ.get("PUSHER_CLIENT_KEY")
    if keyfile and not certfile:
        parser.error("--client-key (PUSHER_CLIENT_KEY) needs --client-cert (PUSHER_CLIENT_CERT)")
    cert = (certfile, keyfile) if keyfile else certfile
    try:
        client = PusherClient(
            args.url, args.api_key, timeout=args.request_timeout, retry=retry, verify=args.ca_file, cert=cert
        )
    except ValueError as exc:  # a CA or certificate file that does not load
        parser.error(str(exc))
    try:
        with client:
            if args.action == "send":
                return _send(client, fields, args)
            if args.action == "batch":
                return _batch(client, args)
            if args.action == "status":
                return _status(client, args)
            if args.action == "fanout":
                return _fanout(client, fields, args)
            if args.action == "fanout-status":
                _print(client.get_fanout(args.fanout_id))
                return OK
            if args.action == "cancel":
                _print(client.cancel(args.request_id))
                return OK
            return _list(client, args)
    except PusherClientError as exc:
        _say(f"pusher: {exc}")
        return _exit_code(exc)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pusher",
        description="Send commands to devices through Preservarium Pusher, and follow them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pusher {VERSION}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the service's base URL (default $PUSHER_URL)")
    common.add_argument("--api-key", help="API key (default $PUSHER_API_KEY)")
    common.add_argument("--ca-file", help="HTTPS: the CA file to verify the service against (default $PUSHER_CA_FILE)")
    common.add_argument("--client-cert", help="HTTPS: this client's certificate, PEM (default $PUSHER_CLIENT_CERT)")
    common.add_argument("--client-key", help="its private key, if not in that file (default $PUSHER_CLIENT_KEY)")
    common.add_argument("--request-timeout", type=float, default=10.0, metavar="S", help="per HTTP request (10)")
    common.add_argument(
        "--retry-for", type=float, default=30.0, metavar="S", help="keep retrying an unavailable service (30)"
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    send = actions.add_parser(
        "send",
        parents=[common],
        help="send one command",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    send.add_argument("--device", required=True, help="device_id")
    send.add_argument("--type", required=True, help="command_type")
    send.add_argument("--protocol", required=True, help="protocol (mqtt, coap, …)")
    send.add_argument("--payload", default="{}", help="JSON object (default {})")
    send.add_argument("--metadata", help="JSON object, e.g. the MQTT topic")
    send.add_argument("--parser-script-ref", help="parser script file name")
    send.add_argument("--qos", type=int, choices=(0, 1, 2), help="MQTT QoS")
    send.add_argument("--retain", action="store_true", default=None, help="MQTT retain")
    send.add_argument("--confirmable", action="store_true", default=None, help="CoAP confirmable")
    send.add_argument("--request-id", help="your own id for the command (also makes a rerun safe)")
    _schedule_arguments(send)
    send.add_argument("--idempotency-key", help="reuse to make a rerun of this exact command safe")
    send.add_argument("--async", dest="respond_async", action="store_true", help="answer once journaled (202)")
    _wait_arguments(send, "wait until it is published (or --until)")

    fanout = actions.add_parser(
        "fanout",
        parents=[common],
        help="send one command to many devices (journaled together, all or none)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    devices = fanout.add_mutually_exclusive_group(required=True)
    devices.add_argument("--devices", help="device_ids, comma-separated")
    devices.add_argument(
        "--devices-file", type=argparse.FileType("r", encoding="utf-8"), help="one device_id per line; - for stdin"
    )
    fanout.add_argument("--type", required=True, help="command_type")
    fanout.add_argument("--protocol", required=True, help="protocol (mqtt, coap, …)")
    fanout.add_argument("--payload", default="{}", help="JSON object (default {})")
    fanout.add_argument("--metadata", help="JSON object; {device_id} in its topic becomes each device's id")
    fanout.add_argument("--parser-script-ref", help="parser script file name")
    fanout.add_argument("--fanout-id", help="your own id for the fan-out (also makes a rerun safe)")
    _schedule_arguments(fanout)
    fanout.add_argument("--idempotency-key", help="reuse to make a rerun of this exact fan-out safe")
    fanout.add_argument("--wait", action="store_true", help="wait until every one of its commands has ended")
    fanout.add_argument("--timeout", type=float, default=300.0, metavar="S", help="how long --wait waits (300)")

    fanout_status = actions.add_parser("fanout-status", parents=[common], help="count a fan-out's commands by status")
    fanout_status.add_argument("fanout_id")

    cancel = actions.add_parser("cancel", parents=[common], help="cancel a command still waiting (never sent)")
    cancel.add_argument("request_id")

    batch = actions.add_parser("batch", parents=[common], help="send commands from a JSON-lines file")
    batch.add_argument("file", type=argparse.FileType("r", encoding="utf-8"), help="one JSON command per line; -")
    batch.add_argument("--chunk-size", type=int, default=100, metavar="N", help="commands per request (100)")
    batch.add_argument("--async", dest="respond_async", action="store_true", help="answer once journaled (202)")
    batch.add_argument(
        "--idempotency-key",
        help="makes a rerun of this file safe: each chunk's key is KEY:LINE (its first line number)",
    )

    status = actions.add_parser("status", parents=[common], help="show a command's status and history")
    status.add_argument("request_id")
    _wait_arguments(status, "wait until it is published (or --until)")

    listing = actions.add_parser("list", parents=[common], help="list recent commands, newest first")
    listing.add_argument("--device", help="only this device_id")
    listing.add_argument("--status", choices=get_args(Status))
    listing.add_argument("--fanout", help="only the commands of this fan-out")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (50; up to 500 per page)")
    listing.add_argument("--all", action="store_true", help="follow every page")
    return parser


def _wait_arguments(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--wait", action="store_true", help=help_text)
    parser.add_argument(
        "--until",
        choices=STAGES,
        default="published",
        help="the stage --wait waits for (delivered and succeeded need the service's KAFKA_STATUS_TOPIC)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S", help="how long --wait waits (30)")


def _schedule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ttl", type=int, metavar="S", help="expire this many seconds after acceptance (or not-before)"
    )
    parser.add_argument("--coalesce-key", help="latest wins: supersedes this device's waiting commands with this key")
    parser.add_argument("--not-before", metavar="TIME", help="deliver at: RFC 3339 with offset, e.g. 2026-12-03T02:00Z")


def _fanout_fields(args: argparse.Namespace) -> dict[str, Any]:
    if args.devices is not None:
        device_ids = [part.strip() for part in args.devices.split(",") if part.strip()]
    else:
        device_ids = [line.strip() for line in args.devices_file if line.strip()]
    if not device_ids:
        raise ValueError("no device ids given")
    return {
        "device_ids": device_ids,
        "command_type": args.type,
        "protocol": args.protocol,
        "payload": _json_object(args.payload, "--payload"),
        "metadata": _json_object(args.metadata, "--metadata") if args.metadata else None,
        "parser_script_ref": args.parser_script_ref,
        "fanout_id": args.fanout_id,
        "ttl_seconds": args.ttl,
        "coalesce_key": args.coalesce_key,
        "not_before": args.not_before,
    }


def _fanout(client: PusherClient, fields: dict[str, Any], args: argparse.Namespace) -> int:
    result = client.send_fanout(fields, idempotency_key=args.idempotency_key)
    _print(result)
    if not args.wait:
        return OK
    deadline = time.monotonic() + args.timeout
    while not (status := client.get_fanout(result.fanout_id)).done:
        if time.monotonic() >= deadline:
            _print(status)
            _say(f"pusher: fan-out {result.fanout_id} not done within {args.timeout:g} s (nothing is lost)")
            return TIMED_OUT
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    _print(status)
    return FAILED if _fanout_failures(status) else OK


def _fanout_failures(status: FanoutStatus) -> int:
    """The commands of a fan-out that ended without being sent or without success."""
    return sum(n for name, n in status.counts.items() if name in TERMINAL and name != "succeeded")


def _command_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "device_id": args.device,
        "command_type": args.type,
        "protocol": args.protocol,
        "payload": _json_object(args.payload, "--payload"),
        "metadata": _json_object(args.metadata, "--metadata") if args.metadata else None,
        "parser_script_ref": args.parser_script_ref,
        "qos": args.qos,
        "retain": args.retain,
        "confirmable": args.confirmable,
        "request_id": args.request_id,
        "ttl_seconds": args.ttl,
        "coalesce_key": args.coalesce_key,
        "not_before": args.not_before,
    }


def _json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise ValueError(f"{option} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object")
    return value


def _send(client: PusherClient, fields: dict[str, Any], args: argparse.Namespace) -> int:
    result = client.send(fields, idempotency_key=args.idempotency_key, respond_async=args.respond_async)
    if not args.wait or result.request_id is None:
        _print(result)
        return OK
    return _status(client, args, result.request_id)


def _status(client: PusherClient, args: argparse.Namespace, request_id: str | None = None) -> int:
    request_id = request_id or args.request_id
    if not args.wait:
        _print(client.get_status(request_id))
        return OK
    try:
        _print(client.wait_for(request_id, until=args.until, timeout=args.timeout))
    except (CommandFailed, WaitTimeout) as exc:
        _print(exc.command)
        raise
    return OK


def _list(client: PusherClient, args: argparse.Namespace) -> int:
    before = None
    while True:
        page = client.list_commands(args.device, args.status, fanout_id=args.fanout, limit=args.limit, before=before)
        for item in page.items:
            _print(item)
        if not args.all or page.next_before is None:
            return OK
        before = page.next_before


class _Line(msgspec.Struct, omit_defaults=True):
    """What `pusher batch` prints for each input line."""

    line: int
    success: bool
    status: str | None = None
    request_id: str | None = None
    error: str | None = None


def _batch(client: PusherClient, args: argparse.Namespace) -> int:
    sent = failed = 0
    done = 0  # the last input line of the chunks sent so far
    try:
        for chunk in _chunks(args.file, args.chunk_size):
            numbers = [number for number, entry in chunk if not isinstance(entry, _Line)]
            commands = [entry for _, entry in chunk if not isinstance(entry, _Line)]
            try:
                key = f"{args.idempotency_key}:{chunk[0][0]}" if args.idempotency_key else None
                results = iter([])
                if commands:
                    results = iter(
                        client.push_commands(commands, idempotency_key=key, respond_async=args.respond_async).results
                    )
            except PusherClientError as exc:
                message = _at_lines(str(exc), numbers)
                for number, entry in chunk:
                    _print(entry if isinstance(entry, _Line) else _Line(number, False, error=message))
                _say(f"pusher: stopped at line {chunk[0][0]}: {message}; the lines from there on were not sent")
                _say(f"pusher: {sent} sent, {failed + len(chunk)} failed or not sent before stopping")
                return _exit_code(exc)
            done = chunk[-1][0]
            for number, entry in chunk:
                if not isinstance(entry, _Line):
                    item = next(results)
                    error = item.error and _at_lines(item.error.detail, numbers)
                    entry = _Line(number, item.success, item.status, item.request_id, error)
                _print(entry)
                sent += entry.success
                failed += not entry.success
    except BrokenPipeError:  # the reader left early: what it did not read is not sent either
        _discard_stdout()
        _say(f"pusher: the output was closed; nothing after line {done} was sent")
        return FAILED
    _say(f"pusher: {sent} sent, {failed} failed")
    return OK if failed == 0 else FAILED


_ITEM_PATH = re.compile(r"\$\.commands\[(\d+)\]")


def _at_lines(message: str, numbers: list[int]) -> str:
    """The service's paths into a chunk's batch (`$.commands[1].qos`) as input lines (`line 3: $.qos`)."""

    def line(match: re.Match[str]) -> str:
        index = int(match[1])
        return f"line {numbers[index]}: $" if index < len(numbers) else match[0]

    return _ITEM_PATH.sub(line, message)


def _chunks(file: IO[str], size: int) -> Iterator[list[tuple[int, Any]]]:
    """Numbered lines read lazily, `size` commands at a time; an unreadable line comes as its _Line report."""
    chunk: list[tuple[int, Any]] = []
    commands = 0
    for number, text in enumerate(file, 1):
        if not text.strip():
            continue
        try:
            command = msgspec.json.decode(text)
            if not isinstance(command, dict):
                raise msgspec.DecodeError("a command must be a JSON object")
            chunk.append((number, command))
            commands += 1
        except msgspec.DecodeError as exc:
            chunk.append((number, _Line(number, False, error=f"not a JSON command: {exc}")))
        if commands >= size:
            yield chunk
            chunk, commands = [], 0
    if chunk:
        yield chunk


def _exit_code(exc: PusherClientError) -> int:
    if isinstance(exc, Unauthorized | Forbidden):
        return DENIED
    if isinstance(exc, NotFound):
        return NOT_FOUND
    if isinstance(exc, WaitTimeout):
        return TIMED_OUT
    if isinstance(exc, Unavailable | RateLimited):
        return UNAVAILABLE
    return FAILED


def _print(value: Any) -> None:
    sys.stdout.buffer.write(msgspec.json.encode(value) + b"\n")
    sys.stdout.flush()


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
