"""TLS: the listening side's SSL context (senders), and the one the node presents to the
destination (pynetdicom's tls_args). Values in, never the flags; the flags are named in the
one-line errors."""
from common import one_line
from node.dicom import ServeError
from node.settings import WebDestination


def tls_context(cert, key, ca):
    """The listening side's SSL context (None: plain TCP, no `cert`); with `ca` (--tls-ca),
    callers must present a certificate those CAs signed."""
    if not cert:
        return None
    return _ssl_context(True, cert, key, ca, "--tls-cert/--tls-key/--tls-ca")


def destination_tls(host, ca, cert, key, node_cert, node_key):
    """pynetdicom's tls_args for the association to the destination at `host`, or None (plain
    TCP, no `ca`): its certificate must be signed by `ca` (--destination-tls-ca: only those
    CAs, not the system's). The node presents `cert` and `key` (--destination-tls-cert/-key),
    else its own `node_cert` and `node_key` (--tls-cert/--tls-key)."""
    if not ca:
        return None
    cert, key = (cert, key) if cert else (node_cert, node_key)
    return (_ssl_context(False, cert, key, ca,
                         "--destination-tls-ca/--destination-tls-cert/--destination-tls-key"),
            host)


def sending_tls(settings):
    """What the send path connects with: pynetdicom's tls_args (or None) to an AE@HOST:PORT
    destination, the SSL context of an https:// one (node/stow.py), None for http://."""
    if isinstance(settings.destination, WebDestination):
        if settings.destination.scheme != "https":
            return None
        return web_tls(settings.destination_tls_ca, settings.destination_tls_cert,
                       settings.destination_tls_key)
    return destination_tls(settings.destination.host, settings.destination_tls_ca,
                           settings.destination_tls_cert, settings.destination_tls_key,
                           settings.tls_cert, settings.tls_key)


def web_tls(ca, cert, key):
    """The SSL context for an https:// destination: its certificate is verified, against `ca`
    (--destination-tls-ca) or, without it, the system's CAs, and its name against the URL's
    host; the node presents `cert`/`key` (--destination-tls-cert/-key) where given."""
    import ssl
    try:
        context = ssl.create_default_context(cafile=ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ServeError("--destination-tls-ca/--destination-tls-cert/--destination-tls-key: "
                         f"{one_line(e)}") from None
    return context


def _ssl_context(server_side, cert, key, ca, flags):
    import ssl
    try:
        context = ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH, cafile=ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert:
            context.load_cert_chain(cert, key)
        if ca and server_side:
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ServeError(f"{flags}: {one_line(e)}") from None
    return context
