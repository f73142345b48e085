"""FlexGen-Lite: high-throughput batch generation with models larger than the GPU."""

from .config import ModelConfig, ModelError
from .generation import FlexGenLite
from .layout import Workload
from .memory import Budgets
from .policy import Policy, PolicyError
from .policy_search import AutoPolicy
from .sampling import SamplingConfig
from .storage import OffloadError

__all__ = ["AutoPolicy", "Budgets", "FlexGenLite", "ModelConfig", "ModelError", "OffloadError", "Policy", "PolicyError",
           "SamplingConfig", "Workload"]
__version__ = "0.1.0"
