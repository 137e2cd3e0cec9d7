"""`python -m healthcheck`: exit 0 when the service on this host answers GET /health (the image's HEALTHCHECK).

It reads the service's own settings (API_PORT; HTTPS when API_TLS_CERTFILE is set) and imports nothing else
of the service, so that a check every 30 s on a small box costs a fraction of a second. Over HTTPS it asks
its own process on loopback, which the certificate does not name: it checks neither name nor issuer. Where
client certificates are required (API_TLS_CLIENT_CAFILE) it presents PUSHER_CLIENT_CERT (and
PUSHER_CLIENT_KEY), the variables the client package reads.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request

from settings import SettingsError, load_settings


def main() -> None:
    """Ask /health once; exit 1 with one line when there is no 200."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise SystemExit(f"pusher healthcheck: {exc}") from None
    url = f"{'https' if settings.https else 'http'}://127.0.0.1:{settings.api_port}/health"
    try:
        urllib.request.urlopen(url, timeout=4, context=_tls(settings.https)).close()
    except OSError as exc:  # no answer, not a 2xx (HTTPError), or a client certificate that does not load
        raise SystemExit(f"pusher healthcheck: {url}: {exc}") from None


def _tls(https: bool) -> ssl.SSLContext | None:
    if not https:
        return None
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if os.environ.get("PUSHER_CLIENT_CERT"):
        context.load_cert_chain(os.environ["PUSHER_CLIENT_CERT"], os.environ.get("PUSHER_CLIENT_KEY") or None)
    return context


if __name__ == "__main__":
    sys.exit(main())
