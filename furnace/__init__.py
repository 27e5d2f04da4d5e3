"""furnace: the shared library of the MGD project (models, losses, data, engine, evaluation)."""
__version__ = "0.1.0"
