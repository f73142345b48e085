"""FlexGen-Lite: high-throughput batch generation with models larger than the GPU."""

from .config import ModelConfig, ModelError
from .generation import FlexGenLite
from .policy import Policy, PolicyError
from .sampling import SamplingConfig
from .storage import OffloadError

__all__ = ["FlexGenLite", "ModelConfig", "ModelError", "OffloadError", "Policy", "PolicyError", "SamplingConfig"]
__version__ = "0.1.0"
