"""The ClientApp that real ``flower-supernode`` processes run: no training, a precomputed reply."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from deploy_bench.model import reply_arrays

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Answer a training message with the node's precomputed 1 MB model (1 example)."""
    cfg = context.run_config
    server_round = int(msg.content["config"]["server-round"])
    arrays = reply_arrays(int(cfg["input-dim"]), int(cfg["classes"]), node=context.node_id,
                          server_round=server_round)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 1})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Answer an evaluation message with dummy metrics (1 example)."""
    content = RecordDict({"metrics": MetricRecord({"accuracy": 0.5, "loss": 1.0, "num-examples": 1})})
    return Message(content=content, reply_to=msg)
