"""The swarm: frozen transformer blocks served by block servers over hivemind, and the clients that use them.

- ``protocol``, ``wire``, ``bounded_streams``: what both sides agree on (records, limits, tensors on the wire).
- ``client/``: :class:`~ptune_search.swarm.client.remote_chain.RemoteBlockChain`, the model's blocks as an
  autograd function over the swarm (routing, chained passes with retries, the DHT connection).
- ``server/``: :class:`~ptune_search.swarm.server.block_server.BlockServer`, a span of blocks served to the
  swarm (request checks, fair queue, activation cache, shared cores, DHT announcer).
- ``launcher``: bootstrap peers, block servers and whole local swarms as processes, run with a
  :class:`~ptune_search.swarm.server.settings.ServerSettings` (every server setting, declared once; the
  command-line flags follow it through ``setting_flags``).

The swarm knows nothing of Ray, Optuna or MLflow.
"""
