"""CURVE settings of a rank's connection (ZeroMQ's authenticated encryption)."""

from __future__ import annotations

import os

from ranklog.errors import ConfigError

CurveKeys = tuple[bytes, bytes, bytes]  # the collector's public key, this client's pair


def curve_keys(
    server_key: str | bytes | None, key_file: str | os.PathLike[str] | None
) -> CurveKeys | None:
    """CURVE settings: the collector's public key (Z85, or a ``.key`` file) and this
    client's key pair (a ``.key_secret`` file from ``ranklog keys``; a fresh pair if None)."""
    if server_key is None:
        if key_file is not None:
            raise ConfigError("curve_key_file needs curve_server_key: the collector's public key")
        return None
    import zmq.auth

    if isinstance(server_key, str) and os.path.exists(server_key):
        server_key = zmq.auth.load_certificate(server_key)[0]
    server = server_key.encode() if isinstance(server_key, str) else server_key
    if key_file is None:
        public, secret = zmq.curve_keypair()
    else:
        public, maybe_secret = zmq.auth.load_certificate(os.fspath(key_file))
        if maybe_secret is None:
            raise ConfigError(f"{key_file} holds no secret key; pass the .key_secret file")
        secret = maybe_secret
    return server, public, secret
