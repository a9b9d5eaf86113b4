"""The emulated GCE metadata server (SPEC §3); the factory is ``broker.metadata.app``."""
