"""fedtext: federated learning of character-level text generators.

The public API, imported lazily (so `import fedtext` stays fast and torch loads on first use):

    from fedtext import ExperimentConfig, train, fed_avg, client_update, CharRNN, ...

Layout: data/ (vocabularies, federated Shakespeare, the client store, batching, tasks),
model/ (the char-RNN, recurrences and C kernel, checkpoints, Keras), fl/ (params, client work,
aggregators, server optimizers, schedules, sampling, the algorithm), backends/ (where clients
run), run/ (round loop, evaluation, run state, training runs, plots, tutorial), pretrain.py,
config.py (the nested config), cli/ (the command line).
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    "ExperimentConfig": "fedtext.config", "load_config": "fedtext.config",
    "merge": "fedtext.config",
    "train": "fedtext.run.train", "run_tutorial": "fedtext.run.tutorial",
    "evaluate": "fedtext.run.evaluation", "evaluate_batches": "fedtext.run.evaluation",
    "build_eval_set": "fedtext.run.evaluation",
    "fed_avg": "fedtext.fl.algorithm", "ServerState": "fedtext.fl.algorithm",
    "FederatedAlgorithm": "fedtext.fl.algorithm",
    "client_update": "fedtext.fl.client", "ClientConfig": "fedtext.fl.client",
    "ClientResult": "fedtext.fl.client",
    "CharRNN": "fedtext.model.char_rnn", "ModelConfig": "fedtext.model.char_rnn",
    "Compute": "fedtext.model.char_rnn",
    "load_checkpoint": "fedtext.model.checkpoint", "save_checkpoint": "fedtext.model.checkpoint",
    "generate_text": "fedtext.model.generate",
    "load_shakespeare": "fedtext.data.store", "load_text_clients": "fedtext.data.store",
    "Vocab": "fedtext.data.vocab", "TASKS": "fedtext.data.tasks",
    "ClientData": "fedtext.data.tasks",
    "FedtextError": "fedtext.errors",
}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fedtext' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])


__all__ = sorted(_API)
