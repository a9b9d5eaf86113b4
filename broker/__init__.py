"""wif-broker: a GCE metadata server backed by Workload Identity Federation."""

__version__ = "0.1.0"
