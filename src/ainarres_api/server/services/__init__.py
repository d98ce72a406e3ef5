"""Use cases: the rules of the substrate. Services open transactions and never import FastAPI."""
