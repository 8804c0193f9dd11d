"""A Flower App for benchmarks/deployment.py: FedAvg whose nodes answer with a precomputed update."""
