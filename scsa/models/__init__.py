from scsa.models.factory import MODELS, create_model, create_model_from_config

__all__ = ["MODELS", "create_model", "create_model_from_config"]
