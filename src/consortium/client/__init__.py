"""The client side: local training, evaluation, per-client state."""
