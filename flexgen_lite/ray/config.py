"""What a Ray job of FlexGen-Lite is made of: the model each replica opens, the sampling defaults of rows, and
how many replicas with which resources. Checked once here; the replicas trust it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..engine.policy import Policy
from ..planning.budgets import Budgets
from ..planning.layout import Workload
from ..planning.policy_search import AutoPolicy


@dataclass(frozen=True)
class ReplicaConfig:
    """The model one replica opens, once, on its own machine: the policy is searched there (policy="auto") for
    `workload` within `budgets` (per replica), or given."""

    model: str  # checkpoint directory, GGUF file or preset name: a path every node can read
    policy: Policy | AutoPolicy | str = "auto"
    budgets: Budgets | None = None
    workload: Workload | None = None
    device: str | None = None  # default: cuda when the replica was given a GPU, else cpu
    threads: int | None = None  # torch threads per replica (torch.set_num_threads); None: Ray's OMP_NUM_THREADS
    served_model_name: str | None = None  # the `model` field of run-batch answers (default: the file name)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if isinstance(self.policy, str) and self.policy != "auto":
            raise ValueError(f"policy must be a Policy, an AutoPolicy or 'auto', got {self.policy!r}")

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.model).name


@dataclass(frozen=True)
class Sampling:
    """Defaults of a row's OpenAI sampling fields; a row's own (non-null) `max_tokens`, `temperature`, `top_p`,
    `top_k`, `seed`, `stop` or `ignore_eos` column wins. temperature 0 is greedy."""

    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def body(self) -> dict[str, Any]:
        fields = asdict(self)
        fields["stop"] = list(self.stop)
        return fields


ROW_FIELDS = tuple(Sampling.__dataclass_fields__)


@dataclass(frozen=True)
class ProcessorConfig:
    """A processor: `concurrency` replicas of `replica`, each with `num_gpus` GPUs (0 on a CPU) and `num_cpus`
    CPUs (default: `threads`, or 1), taking `batch_size` rows per call (default: 4 blocks of an explicit policy,
    else 128; the auto search then plans blocks for a call of that many rows)."""

    model: str
    policy: Policy | AutoPolicy | str = "auto"
    budgets: Budgets | None = None
    workload: Workload | None = None
    device: str | None = None
    threads: int | None = None
    concurrency: int = 1
    num_gpus: float = 0
    num_cpus: float | None = None
    batch_size: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1 replica, got {self.concurrency}")
        if self.num_gpus < 0 or (self.num_cpus is not None and self.num_cpus <= 0):
            raise ValueError(f"num_gpus must be >= 0 and num_cpus > 0, got {self.num_gpus}, {self.num_cpus}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 row, got {self.batch_size}")
        self.replica()  # checks its fields

    @property
    def rows_per_call(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return 4 * self.policy.block_size if isinstance(self.policy, Policy) else 128

    @property
    def cpus_per_replica(self) -> float:
        return self.num_cpus if self.num_cpus is not None else (self.threads or 1)

    def replica(self) -> ReplicaConfig:
        workload = self.workload
        if workload is not None and workload.num_prompts is None and not isinstance(self.policy, Policy):
            workload = Workload(workload.prompt_len, workload.gen_len, self.rows_per_call)
        device = self.device or ("cpu" if self.num_gpus == 0 else None)
        return ReplicaConfig(self.model, self.policy, self.budgets, workload, device, self.threads,
                             self.served_model_name)
