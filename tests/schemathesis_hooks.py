"""Schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks): let it send MessagePack bodies too."""

import msgspec
import schemathesis


@schemathesis.serializer("application/msgpack")
def to_msgpack(ctx: schemathesis.SerializationContext, value: object) -> bytes:
    """Encode a generated body as MessagePack (integers MessagePack cannot hold make an invalid body)."""
    try:
        return msgspec.msgpack.encode(value)
    except OverflowError:
        return b"\xc1"
