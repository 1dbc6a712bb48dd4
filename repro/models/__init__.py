"""The models: the AlexNet family and the four-layer CIFAR net, built from a `ModelConfig` through a registry."""

from repro.models import alexnet, cifar4  # noqa: F401  (registers the models)
from repro.models.registry import build_model, default_config, list_models, register_model
from repro.models.summary import ModelSize, count_macs, count_params, model_size, models_table

__all__ = ["ModelSize", "build_model", "count_macs", "count_params", "default_config", "list_models",
           "model_size", "models_table", "register_model"]
