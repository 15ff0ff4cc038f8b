"""replicate-relay: a self-hosted webhook replay and inspection proxy for Replicate."""

__version__ = "0.1.0"
