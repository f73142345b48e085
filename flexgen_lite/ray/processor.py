"""The Ray Data processor: `build_processor(config)(dataset)` maps the dataset's rows through a pool of replicas
(`map_batches` with a callable class), as vLLM's `ray.data.llm` does. Ray Data streams blocks to the replicas,
balances them, restarts a replica whose process dies and retries its blocks (`max_restarts`, `max_task_retries`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray.data

from .config import ProcessorConfig
from .replica import PromptReplica


def map_replicas(ds: ray.data.Dataset, replica: type, config: ProcessorConfig, batch_size: int,
                 **constructor: Any) -> ray.data.Dataset:
    """`ds` through `config.concurrency` actors of `replica` (constructed with the replica config and
    `constructor`), `batch_size` rows per call. A dead actor is restarted and its calls are retried, without limit:
    Ray Data's defaults for an actor pool (max_restarts=-1, max_task_retries=-1)."""
    return ds.map_batches(
        replica, batch_size=batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"config": config.replica(), **constructor},
        compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.cpus_per_replica, num_gpus=config.num_gpus or None)


@dataclass(frozen=True)
class Processor:
    """Applied to a Dataset of rows (`prompt` or `messages`, optional sampling columns), gives the lazy Dataset of
    those rows with generated_text, generated_tokens, finish_reason, num_input_tokens and num_generated_tokens.
    preprocess / postprocess: a row -> row function before / after (as `ray.data.llm`'s)."""

    config: ProcessorConfig
    preprocess: Callable[[dict], dict] | None = None
    postprocess: Callable[[dict], dict] | None = None

    def __call__(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        if self.preprocess is not None:
            ds = ds.map(self.preprocess)
        ds = map_replicas(ds, PromptReplica, self.config, self.config.rows_per_call, sampling=self.config.sampling)
        if self.postprocess is not None:
            ds = ds.map(self.postprocess)
        return ds


def build_processor(config: ProcessorConfig, preprocess: Callable[[dict], dict] | None = None,
                    postprocess: Callable[[dict], dict] | None = None) -> Processor:
    """The processor of `config`; nothing starts until its output Dataset is consumed."""
    return Processor(config, preprocess, postprocess)
