"""FlexGen-Lite: high-throughput batch generation with models larger than the GPU."""

from .system import threads  # noqa: F401  first: OpenMP's spin is read from the environment once, when torch loads it

# isort: split
from .engine.policy import Policy, PolicyError
from .engine.storage import OffloadError
from .generation import FlexGenLite
from .kernels.sampling import SamplingConfig
from .models.config import ModelConfig, ModelError
from .models.gguf_file import default_model_path
from .planning.budgets import Budgets
from .planning.layout import Workload
from .planning.policy_search import AutoPolicy

__all__ = ["AutoPolicy", "Budgets", "FlexGenLite", "ModelConfig", "ModelError", "OffloadError", "Policy", "PolicyError",
           "SamplingConfig", "Workload", "default_model_path"]
__version__ = "0.1.0"
