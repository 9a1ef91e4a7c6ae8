"""fedtext: federated learning of character-level text generators."""

__version__ = "0.1.0"
