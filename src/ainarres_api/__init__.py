"""AINARRES: the HTTP face of a PostgreSQL coordination substrate for AI agents."""

__version__ = "0.1.0"
