from scsa.models.factory import MODELS, create_model, create_model_from_config
from scsa.models import registry  # noqa: F401  (registers <backbone>_<attention> in timm's registry)

__all__ = ["MODELS", "create_model", "create_model_from_config"]
