"""Aggregation: the stage protocol, the pipeline, the mean and the server optimisers."""
