"""A hostile full DHT node of a swarm: stores whatever it likes, signed with whatever key it holds.

It runs on a :class:`SwarmConnection`'s event loop, as a full (not client-mode) node whose p2p identity is
its own :class:`PeerKey`, so records it signs with that key speak for a live peer that serves no block.
Its validator signs every record with the key it is given and accepts everything, so it keeps its own
forgeries and hands them out when asked: honest nodes must refuse them when it stores and when it answers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from hivemind.dht import DHTNode
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.signed_records import PeerKey, SwarmRecordValidator


class ForgingValidator(SwarmRecordValidator):
    """Signs every record with its key, whatever the subkey says; validates nothing."""

    def sign_value(self, record: DHTRecord) -> bytes:
        signature = self._private_key.sign(self._serialize_record(record))
        return record.value + self.SIGNATURE_FORMAT.replace(b"_value_", signature)

    def validate(self, record: DHTRecord) -> bool:
        return True


class ForgingPeer:
    def __init__(self, initial_peers: Sequence[str]):
        self.key = PeerKey()
        self._loop_owner = SwarmConnection(initial_peers)
        with tempfile.TemporaryDirectory() as folder:
            identity = Path(folder) / "identity"
            self.key.write_identity(identity)
            self.node: DHTNode = self.run(
                DHTNode.create(
                    initial_peers=list(initial_peers),
                    host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                    identity_path=str(identity),
                    check_if_identity_free=False,
                    record_validator=ForgingValidator(self.key),
                )
            )
        assert self.node.peer_id == self.key.peer_id

    def run(self, coroutine: Any) -> Any:
        return self._loop_owner.run(coroutine, timeout=60)

    def store(self, key: str, value: Any, subkey: Any = None, signer: Optional[PeerKey] = None, ttl=600.0) -> bool:
        """Store ``value`` under ``key`` (and ``subkey``), signed by ``signer`` (default: the peer's own key)."""
        self.node.protocol.record_validator = ForgingValidator(signer or self.key)
        return self.run(self.node.store(key, value, get_dht_time() + ttl, subkey=subkey))

    def subkeys(self, key: str) -> list[Any]:
        """The subkeys under ``key`` as the honest nodes hold them (asked through the connection's client)."""
        found = self._loop_owner.run(self._loop_owner.node.get(key, latest=True), timeout=60)
        return [] if found is None or not isinstance(found.value, dict) else list(found.value)

    def close(self) -> None:
        try:
            self.run(self.node.shutdown())
        finally:
            self._loop_owner.close()
