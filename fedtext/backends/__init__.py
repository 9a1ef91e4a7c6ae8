"""Backends: where `client_update` runs (in process, worker processes, Ray, Flower nodes)."""
