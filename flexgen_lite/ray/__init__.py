"""FlexGen-Lite on Ray: a Ray Data processor whose replicas (stateful actors) each open the model once and run
whole blocks, and the `run-batch --ray` file job over them. Needs the `ray` extra: pip install 'flexgen-lite[ray]'.

>>> from flexgen_lite.ray import ProcessorConfig, build_processor
>>> processor = build_processor(ProcessorConfig("path/to/model", concurrency=2, threads=1))
>>> processor(ray.data.from_items([{"prompt": "Paris is"}])).take_all()
"""

from __future__ import annotations

try:
    import ray.data  # noqa: F401 - fail here, with the install line, not deep inside a replica
except ImportError as e:  # pragma: no cover - the extra is installed by scripts/setup.sh
    raise ImportError(f"flexgen_lite.ray needs Ray Data ({e}): pip install 'flexgen-lite[ray]' "
                      "(or pip install 'ray[data]')") from None

from .config import ProcessorConfig, ReplicaConfig, Sampling
from .processor import Processor, build_processor

__all__ = ["Processor", "ProcessorConfig", "ReplicaConfig", "Sampling", "build_processor"]
