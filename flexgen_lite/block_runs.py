"""A FlexGenLite's blocks: each block's shape within the budgets (block_shapes.py), its cache checked when made,
its rows' limits and generators, the checks after each step, and the heap's limit within the host budget."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .engine.block import Block
from .engine.kv_cache import cache_bytes_per_token
from .engine.policy import Policy, split_counts
from .guided import Guide
from .kernels.logit_rules import LogitRules, ending_tokens
from .kernels.sampling import SamplingConfig, row_generators, warpers
from .planning.budgets import check_budgets, check_fits
from .planning.layout import Workload
from .planning.memory_plan import peak_memory
from .step_checks import cancel_check, step_message, stop_check, straggler_check
from .stragglers import Carried
from .system.memory import return_freed_memory

HOST_TRANSIENT = 0.1  # heap_limit with CUDA: the host budget's share kept for a layer's host-side temporaries


def unseeded() -> int:
    """A seed for a row without one in a block of seeded rows, drawn from torch's generator (torch.manual_seed
    makes it repeat)."""
    return int(torch.randint(2**62, ()))


class BlockRuns:
    """FlexGenLite's part that runs one block at a time (its config, device, policy, shapes, engine, budgets)."""

    def room_beside(self, prompt_len: int, gen_len: int) -> float | None:
        """Bytes the budgets leave on the compute device (a CPU: host RAM) beside the planned peak of a block of
        these lengths; None without budgets."""
        if self.budgets is None:
            return None
        cuda = self.device.is_cuda
        _, peak = peak_memory(self.config, Workload(prompt_len, gen_len), self.policy, cuda)
        left = [budget - peak[tier] for tier in (("gpu",) if cuda else ("cpu", "gpu"))
                if (budget := getattr(self.budgets, tier)) is not None]
        return max(0.0, min(left)) if left else None

    def _check_budgets(self, workload: Workload | None, what: str, policy: Policy | None = None) -> None:
        """Raise PolicyError where the policy's (default: the running one's) peaks for `workload` (None: before
        any prompt, a token's worth of cache) pass the budgets."""
        policy = policy or self.policy
        plan, peak = peak_memory(self.config, workload or Workload(1, 1), policy, self.device.is_cuda)
        prompts = (f"for prompts of {workload.prompt_len} + {workload.gen_len} tokens" if workload else
                   "before any prompt (weights and buffers)")
        check_budgets(peak, plan, self.budgets, self.device.is_cuda, f"{what} ({policy.flags()}) {prompts}",
                      searched=self.search is not None, policy=policy)

    def block_rows(self, lengths: list[int], gen_len: int) -> int:
        """How many of the next prompts (their lengths, a planned block's worth) one block of `gen_len` new tokens
        holds within the budgets, the running engine set to that block's shape (block_shapes.py)."""
        policy = self.shapes.planned
        if self.budgets is not None:
            policy = self.shapes.shape_for(Workload(max(lengths), gen_len), len(lengths),
                                           lambda p, w: self._check_budgets(w, "this block", p))
        self.engine, self.policy = self.shapes.use(policy), policy
        self.engine.heap_limit = self.heap_limit(Workload(max(lengths), gen_len))
        return min(len(lengths), policy.block_size)

    def heap_limit(self, workload: Workload) -> int | None:
        """The resident bytes past which the engine gives freed heap pages back before a step or a prefill's layer
        (Engine._hold_heap): the host budget beyond what this process held before the model, less what a layer
        may allocate on top (a CPU's: the plan's working set) and the plan's reserve (small buffers: a server's
        requests; helper-34 saw a server at 1500.5 MiB under --cpu-mem 1500MiB without it); None without a host
        budget."""
        if self.budgets is None or self.budgets.cpu is None:
            return None
        cuda = self.device.is_cuda
        plan, _ = peak_memory(self.config, workload, self.policy, cuda)
        transient = HOST_TRANSIENT * self.budgets.cpu if cuda else plan["gpu"]["working set"]
        return int(self._rss_before + self.budgets.cpu - transient - plan["cpu"]["reserve"])

    def _run_block(self, prompts: list[list[int]], sampling: SamplingConfig, keep_logits: bool = False,
                   configs: list[SamplingConfig] | None = None, indices: list[int] | None = None, label: str = "block",
                   report: Callable[[Block], None] | None = None, moving: dict[int, Carried] | None = None,
                   sharing: Callable[[int], int] | None = None, rule: bool | None = None,
                   cancelled: Callable[[int], bool] | None = None, logprobs: list[int | None] | None = None
                   ) -> Block:
        """Generate for `prompts`, whose places in the caller's request are `indices` (they seed sampling), each by
        its `configs` (default: sampling): its max_new_tokens, seed, temperature, top-k and top-p. moving: rows
        carried on from an earlier block (their tokens already end their prompts here; their generators go on).
        sharing(active): the rows a later block would hold with this one's `active` last rows
        (stragglers.worth_ending); None: the block runs to its end. cancelled(row): its row stops after the next
        step. logprobs: each prompt's alternatives to keep with its tokens' logprobs, or None (Block.logprobs)."""
        cfg, policy, moving = self.config, self.policy, moving or {}
        configs = configs or [sampling] * len(prompts)
        eos = tuple(cfg.eos_token_id) if any(c.stop_at_eos for c in configs) else ()
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or [0])[0]
        limits, seeds = [c.max_new_tokens for c in configs], [c.seed for c in configs]
        fillers = policy.block_size - len(prompts)  # rows without prompts: never sampled
        generators = None
        if any(c.temperature > 0 and c.seed is not None for c in configs):
            indices = list(range(len(prompts))) if indices is None else list(indices)
            generators = [row_generators(unseeded() if seed is None else seed, [index])[0]
                          for seed, index in zip(seeds + [0] * fillers, indices + [-1] * fillers, strict=True)]
            for row, carry in moving.items():
                generators[row] = carry.generator
        limits = [n - len(moving[row].tokens) if row in moving else n for row, n in enumerate(limits)]
        block = Block.from_prompts(prompts, policy.block_size, policy.gpu_batch_size, max(limits), pad_id, eos,
                                   self.device.device, generators, policy.share_prefix,
                                   limits if moving or len(set(limits)) > 1 else None)
        rows = configs + [configs[0]] * fillers
        if len({warpers(c) for c in configs}) > 1:  # rows that pick their tokens differently
            block.samplings = rows
        block.rules = LogitRules.of(rows, cfg.eos_token_id or (), self.device.device)
        block.ended_by = ending_tokens(rows, cfg.eos_token_id or (), self.device.device)
        if any(c.guided for c in configs):
            block.guides = [self._guide(c, p, moving.get(row), cfg.eos_token_id or ()) if c.guided else None
                            for row, (c, p) in enumerate(zip(configs, prompts, strict=True))] + [None] * fillers
        if moving and block.rules is not None:  # a carried row's output so far ends its prompt here
            carried = [len(moving[row].tokens) if row in moving else 0 for row in range(len(rows))]
            block.output_from = (block.prompt_len - torch.tensor(carried)).to(self.device.device)
        if len({c.stop_at_eos for c in configs}) > 1:
            block.ends_at_eos = torch.tensor([c.stop_at_eos for c in configs] + [True] * fillers)
        if logprobs is not None and any(k is not None for k in logprobs):
            block.logprobs = list(logprobs) + [None] * fillers
            block.row_logprobs = [list(moving[row].logprobs) if row in moving else [] for row in range(len(prompts))]
            block.row_logprobs += [[] for _ in range(fillers)]
        self._check_cache_fits(block)
        stops = [c.stop for c in configs]
        steps = [stop_check(self.tokenizer, stops, moving)] if any(stops) else []
        if cancelled is not None:
            steps.append(cancel_check(cancelled, len(prompts)))
        if report is not None:
            steps.append(report)
        if self.progress is not None:
            steps.append(lambda block: self.progress(step_message(label, self.engine.times, len(prompts),
                                                                  block.gen_len)))
        if sharing is not None:
            steps.append(straggler_check(self.engine, len(prompts), sharing, rule))
        on_step = None
        if steps:
            def on_step(block: Block) -> None:
                for step in steps:
                    step(block)
        self.engine.run(block, configs[0], on_step, keep_logits)  # how rows pick where block.samplings does not say
        return block

    def _guide(self, config: SamplingConfig, prompt: list[int], carried: Carried | None, eos) -> Guide:
        """A guided row's Guide: its prompt, and the tokens it made in an earlier block (they end its prompt here)."""
        made = carried.tokens if carried is not None else []
        return Guide(config.guided, self.tokenizer, prompt[:len(prompt) - len(made)], made, tuple(eos),
                     config.stop_at_eos)

    def _check_cache_fits(self, block: Block) -> None:
        engine = self.engine
        if engine.cache is not None and engine.cache.max_len >= block.prompt_len + block.gen_len:
            return
        engine.free_cache()  # the old cache's room is free for the new one
        return_freed_memory()  # and its pages given back: kept, they stayed resident beside the new, longer one
        n, planned = self.policy.block_size, self.shapes.planned.block_size
        if self.budgets is not None:
            self._check_budgets(Workload(block.prompt_len, block.gen_len), "this block" if planned == n else
                                f"this block, narrowed from the policy's {planned} rows to {n},")
        c = self.config
        per_token = cache_bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype,
                                          self.policy.cache_compression())
        per_seq = per_token * c.cached_length(block.prompt_len + block.gen_len) / c.num_layers  # rings: windows
        gpu, cpu, disk = split_counts(n, self.policy.percents("cache"))
        check_fits({"gpu": gpu * per_seq, "cpu": cpu * per_seq, "disk": disk * per_seq}, self.device,
                   self.policy.offload_dir, "the KV cache")
