"""FlexGen-Lite: high-throughput batch generation with models larger than the GPU."""

from . import threads  # noqa: F401  first: OpenMP's spin is read from the environment once, when torch loads it

# isort: split
from .budgets import Budgets
from .config import ModelConfig, ModelError
from .generation import FlexGenLite
from .gguf_file import default_model_path
from .layout import Workload
from .policy import Policy, PolicyError
from .policy_search import AutoPolicy
from .sampling import SamplingConfig
from .storage import OffloadError

__all__ = ["AutoPolicy", "Budgets", "FlexGenLite", "ModelConfig", "ModelError", "OffloadError", "Policy", "PolicyError",
           "SamplingConfig", "Workload", "default_model_path"]
__version__ = "0.1.0"
