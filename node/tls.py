"""TLS: the listening side's SSL context (senders), and the one the node presents to the
destination (pynetdicom's tls_args). Values in, never the flags; the flags are named in the
one-line errors."""
from common import one_line
from node.dicom import ServeError


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
