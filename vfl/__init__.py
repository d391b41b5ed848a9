"""vfl: vertical federated learning across independent node processes (private set intersection + split networks)."""

__version__ = "0.1.0"
