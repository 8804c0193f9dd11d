"""Built-in models and the loader for user-supplied ones."""

from consortium.models.zoo import MODELS, build_model, cnn, logistic, mlp, model_factory

__all__ = ["MODELS", "build_model", "cnn", "logistic", "mlp", "model_factory"]
