"""Data: vocabularies, federated Shakespeare, the packed client store, batching, tasks."""
