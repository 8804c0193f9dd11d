"""The client side of the Flower benchmark worker: model, data cache and the ``ClientApp``.

This module lives apart from ``worker.py`` so that Flower's Ray actors import it by name
(the worker's folder reaches them through ``PYTHONPATH``). Only the ``ClientApp`` object
travels with each message; the data never does. Each actor process opens the ``.npz`` file
once, on its first message, and keeps it in ``_CACHE`` keyed by path; a virtual client then
slices its own rows out of that one copy, so memory does not grow with the number of clients.

Nothing here imports consortium: the Flower venv must not need it.
"""

from __future__ import annotations

import json
from math import prod
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

__all__ = ["app", "build_model", "client_seed", "load_meta"]

_CACHE: dict[str, dict[str, Any]] = {}


def load_meta(data: Any) -> dict[str, Any]:
    """The settings stored as a JSON string in the npz's 0-d ``meta`` array."""
    return json.loads(str(data["meta"]))


def build_model(meta: dict[str, Any]) -> nn.Module:
    """The same two models as consortium's zoo, built after ``torch.manual_seed(meta['init_seed'])``.

    Seeding before construction is what consortium's ``build_model`` does, so the initial
    global weights are the ones the other systems in the benchmark start from.
    """
    shape = tuple(int(v) for v in meta["input_shape"])
    k = int(meta["num_classes"])
    torch.manual_seed(int(meta.get("init_seed", meta["seed"])))
    if meta["model"] == "logistic":
        return nn.Sequential(nn.Flatten(), nn.Linear(prod(shape), k))
    if meta["model"] == "cnn":
        c, h, w = shape
        return nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), k),
        )
    raise ValueError(f"unknown model {meta['model']!r}; expected 'logistic' or 'cnn'")


def client_seed(seed: int, server_round: int, client: int) -> int:
    """Seed of one client's shuffling in one round (distinct for every (round, client))."""
    return (int(seed) * 1_000_003 + int(server_round)) * 10_000_019 + int(client)


def _training_data(path: str) -> dict[str, Any]:
    """This process's one copy of the training rows (loaded on first use)."""
    cached = _CACHE.get(path)
    if cached is None:
        torch.set_num_threads(1)  # one CPU per actor: Ray runs two actors on two cores
        with np.load(path) as data:
            meta = load_meta(data)
            cached = {
                "meta": meta,
                "x": torch.from_numpy(data["x_train"]),
                "y": torch.from_numpy(data["y_train"]),
                "offsets": [int(v) for v in data["train_offsets"]],
            }
        cached["model"] = build_model(meta)  # reused: every message loads the global weights
        _CACHE[path] = cached
    return cached


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global weights, run plain SGD over this client's rows, return the weights."""
    config = msg.content["config"]
    data = _training_data(str(config["data"]))
    meta = data["meta"]
    client = int(context.node_config["partition-id"])
    start, stop = data["offsets"][client], data["offsets"][client + 1]
    n = stop - start
    if n <= 0:
        raise ValueError(f"client {client} has no training rows")
    x, y = data["x"][start:stop], data["y"][start:stop]

    model: nn.Module = data["model"]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=float(meta["lr"]))  # no momentum, no decay
    gen = torch.Generator().manual_seed(
        client_seed(meta["seed"], int(config["server-round"]), client)
    )
    batch = int(meta["batch_size"])
    loss_fn = nn.functional.cross_entropy
    for _ in range(int(meta["local_epochs"])):
        perm = torch.randperm(n, generator=gen)  # a fresh shuffle every epoch
        for s in range(0, n, batch):
            idx = perm[s : s + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()

    reply = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),  # copies the tensors' bytes
            "metrics": MetricRecord({"num-examples": n}),  # FedAvg's weight
        }
    )
    return Message(content=reply, reply_to=msg)
