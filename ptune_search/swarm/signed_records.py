"""Signed DHT records: a server's records can only be written by that server, and every node of the swarm checks.

A block server's p2p identity is an RSA key (:class:`PeerKey`); its peer id is the hash of the key's public part
(libp2p's rule), so whoever signs with the key speaks for that peer id and nobody else. The server stores its
block records under the subkey ``<peer id>[owner:ssh-rsa AAAA...]``; hivemind's ``RSASignatureValidator`` signs
what a node stores under its own key and refuses records under an owner key that this key did not sign.
:class:`SwarmRecordValidator` also refuses records without an owner key (so nobody can overwrite a block's key
with a plain value or write an unsigned record) and records whose peer id is not the owner key's. Every DHT node
of the swarm runs it: servers and bootstrap peers refuse to store such records, clients drop them when found.

Example::

    from hivemind.dht.node import DHTNode
    from hivemind.utils import get_dht_time

    key = PeerKey.load_or_create(Path("server.id"))        # or PeerKey() for a new identity
    node = await DHTNode.create(record_validator=SwarmRecordValidator(key), identity_path="server.id")
    await node.store("m.0", b"record", get_dht_time() + 60, subkey=key.subkey)  # signed with the key
    assert owner_peer_id(key.subkey) == key.peer_id        # what clients check
    await node.shutdown()
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Optional

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

logger = logging.getLogger(__name__)
MAX_REPORTED = 1024  # refused records remembered as already reported (then forgotten, so reported again)
MAX_PEER_ID_CHARS, MAX_OWNER_KEY_CHARS = 128, 4096
MAX_SUBKEY_CHARS = MAX_PEER_ID_CHARS + len("[owner:ssh-rsa ]") + MAX_OWNER_KEY_CHARS
_SUBKEY_RE = re.compile(
    rf"(?P<peer>[1-9A-HJ-NP-Za-km-z]{{1,{MAX_PEER_ID_CHARS}}})"
    rf"\[owner:(?P<key>ssh-rsa [A-Za-z0-9+/=]{{1,{MAX_OWNER_KEY_CHARS}}})\]"
)


class PeerKey(RSAPrivateKey):
    """A server's RSA key: it signs the server's records and is its p2p identity (``identity_path`` of p2pd)."""

    @classmethod
    def from_der(cls, der: bytes) -> "PeerKey":
        key = cls.__new__(cls)
        key._private_key = serialization.load_der_private_key(der, password=None)
        return key

    @classmethod
    def load_or_create(cls, path: Path) -> "PeerKey":
        """The key in the libp2p identity file ``path``; a new one, written there (mode 0600), if it is absent."""
        if path.exists():
            try:
                message = crypto_pb2.PrivateKey.FromString(path.read_bytes())
                if message.key_type != crypto_pb2.KeyType.RSA:
                    raise ValueError(f"key type {message.key_type} is not RSA")
                return cls.from_der(message.data)
            except Exception as e:  # noqa: BLE001 - protobuf and cryptography raise many kinds
                raise ValueError(
                    f"{path} is not an RSA libp2p identity file ({type(e).__name__}: {e}); "
                    "remove it to let the server create a new identity (its peer id changes)"
                ) from None
        key = cls()
        key.write_identity(path)
        return key

    def write_identity(self, path: Path) -> None:
        """Write the key as a libp2p identity file, readable by its owner only."""
        message = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=self.to_bytes())
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(message.SerializeToString())

    @functools.cached_property
    def peer_id(self) -> PeerID:
        return peer_id_of(self.get_public_key())

    @property
    def subkey(self) -> str:
        """The subkey a server stores its records under: its peer id, then its public key as owner."""
        return f"{self.peer_id.to_base58()}[owner:{self.get_public_key().to_bytes().decode()}]"


def peer_id_of(public_key: RSAPublicKey) -> PeerID:
    """The libp2p peer id of an RSA key: the sha2-256 multihash of its protobuf-encoded DER public key."""
    ssh_key = serialization.load_ssh_public_key(public_key.to_bytes())
    der = ssh_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256")))


@functools.lru_cache(maxsize=1024)
def owner_peer_id(subkey: object) -> PeerID:
    """The peer a record's subkey speaks for: its owner key's peer id, which the subkey must also name.

    A ValueError says why a subkey is not a signed server's (no owner key, or a peer id not the key's).
    """
    match = _SUBKEY_RE.fullmatch(subkey) if isinstance(subkey, str) else None
    if match is None:
        raise ValueError("it is not signed: its subkey is not '<peer id>[owner:<ssh-rsa key>]'")
    try:
        owner = peer_id_of(RSAPublicKey.from_bytes(match["key"].encode()))
    except Exception as e:  # noqa: BLE001 - a malformed key is just another bad record
        raise ValueError(f"its owner key is malformed ({type(e).__name__})") from None
    if owner.to_base58() != match["peer"]:
        raise ValueError(f"it names peer {match['peer'][:60]} but is signed by the key of peer {owner}")
    return owner


class SwarmRecordValidator(RSASignatureValidator):
    """Accepts only records stored under a signed server subkey (see :func:`owner_peer_id`) and signed by it.

    A refused record is logged as a WARNING once per key and subkey (the DHT drops it either way).
    """

    def __init__(self, private_key: Optional[RSAPrivateKey] = None):
        super().__init__(private_key)
        self._reported: set[tuple[bytes, bytes]] = set()

    def validate(self, record: DHTRecord) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey) if record.subkey else None
            owner_peer_id(subkey)
        except Exception as e:  # noqa: BLE001 - garbage subkeys are refused like unsigned ones
            self._report(record, f"refusing a DHT record under subkey {_show(record.subkey)}: {e}")
            return False
        if not super().validate(record):
            self._report(record, f"refusing a DHT record under subkey {_show(record.subkey)}: its signature is invalid")
            return False
        return True

    def _report(self, record: DHTRecord, message: str) -> None:
        if (record.key, record.subkey) in self._reported:
            return
        if len(self._reported) >= MAX_REPORTED:
            self._reported.clear()
        self._reported.add((record.key, record.subkey))
        logger.warning(message)


def _show(subkey: bytes) -> str:
    try:
        return repr(MSGPackSerializer.loads(subkey))[:120]
    except Exception:  # noqa: BLE001
        return repr(subkey)[:120]
