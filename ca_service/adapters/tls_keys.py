"""Loading a certificate chain and its private key into an ``ssl.SSLContext``.

``ssl`` only loads from files, so the PEMs pass through a private (0700) temporary directory that is
removed before returning: the key never stays on disk.  The one copy of this for every TLS listener.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from ca_service.pki.certs import certs_to_pem
from ca_service.pki.keys import PrivateKey, private_key_to_pem


def load_chain_into(context: ssl.SSLContext, chain: Sequence[x509.Certificate], key: PrivateKey) -> None:
    """(Re)load a certificate chain and key into ``context``; new handshakes use it at once."""
    with tempfile.TemporaryDirectory(prefix="ca-service-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(certs_to_pem(chain))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(private_key_to_pem(key))
        context.load_cert_chain(cert_path, key_path)
