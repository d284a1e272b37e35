"""A simulated wide-area network on one machine: network namespaces joined by a shaping user-space switch."""
