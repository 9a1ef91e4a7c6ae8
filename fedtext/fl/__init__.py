"""Federated learning proper: params arithmetic, client work, aggregators, server optimizers,
schedules, client sampling, and the algorithm that composes them (algorithm.fed_avg)."""
