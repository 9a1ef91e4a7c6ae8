"""fedtext over Flower's deployment engine (SuperLink, SuperNodes, `flwr run`); the only
package of fedtext that imports `flwr` (an optional extra: `pip install 'fedtext[flower]'`).

Flower is only the transport. The ServerApp runs fedtext's own `train()` (sampling, aggregator,
server optimizer, evaluation, a checkpoint every round, metrics.jsonl, --resume) with a
`Population` of the SuperNodes and a `FlowerBackend` whose `map` sends each client's job to
its node as a Flower message; the ClientApp answers with the same `client_update` (or
`evaluate_client`) the simulator runs, on the node's own data:

    ServerApp (server_app.py)                    SuperNode k (client_app.py)
    train(cfg, out, population=nodes,            node config: data-path, client-id
          backend=FlowerBackend(grid))
      query   ------------------------------->   its client id and data sizes
      train   params + job (messages.py) ---->   client_update(params, own data, config, seed)
              <---- delta + metric sums          (or Error(reason) for bad data)
      evaluate params + job ----------------->   evaluate_client(...) on its test split
              <---- loss/correct/count sums

    client_app.py   the ClientApp: @app.train, @app.evaluate, @app.query
    server_app.py   the ServerApp: run config -> train()
    backend.py      FlowerBackend (Backend.map over a Flower Grid), the nodes' Population
    messages.py     jobs and results <-> Flower records (ArrayRecord, ConfigRecord, MetricRecord)
    commands.py     the flower-superlink / flower-supernode / flwr command lines, certificates
    fedtext-app/    the Flower app project (pyproject.toml) that `flwr run` bundles; it holds
                    no code: its components are the modules above, installed with fedtext

`fedtext flower ...` (fedtext/cli/flower.py) prints and runs those commands; docs/flower.md
walks through a deployment.
"""

from __future__ import annotations

from fedtext.errors import FedtextError


def require_flwr():
    """The `flwr` module, or a FedtextError saying how to install it."""
    try:
        import flwr
    except ImportError:
        raise FedtextError("Flower is not installed: pip install 'fedtext[flower]'") from None
    return flwr
