"""The user-facing API: open a model, place it by a policy, generate text or token ids in blocks."""

from __future__ import annotations

import functools
import gc
import sys
import threading
from collections.abc import Callable

import torch

from .block_runs import BlockRuns
from .block_shapes import BlockShapes
from .completion_text import cut_at_stop, text_after
from .engine.block import block_order
from .engine.block_schedule import Engine
from .engine.policy import Policy, PolicyError
from .engine.storage import DiskStore, MemoryLedger
from .engine.trace import NULL
from .engine.weights import in_8_bits, on_cpu, place_weights, planned_bytes, rounded_to_8_bits
from .kernels.sampling import SamplingConfig, per_prompt
from .model_source import (
    compression_notice,
    ends_notice,
    for_model,
    kept_as_stored,
    kept_groups,
    kept_groups_hint,
    open_model,
    source_quantization,
)
from .models.config import ModelConfig, ModelError
from .models.specs import layer_specs
from .planning.budgets import Budgets, check_fits
from .planning.dtype_choice import compute_dtype
from .planning.layout import Workload
from .planning.policy_search import AutoPolicy
from .step_checks import streamer
from .stragglers import Carried, later_rows, next_group
from .system.devices import ComputeDevice, keep_freed_memory
from .system.memory import process_rss, return_freed_memory


def one_call(method):
    """A FlexGenLite call that runs the engine: one at a time per model. Calls from other threads wait their turn
    (the engine keeps a run's state: two at once crashed or mixed their tokens); a call from inside one of the
    model's own callbacks is refused, as it would overwrite the running call's state."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self._caller == threading.get_ident():
            raise ModelError(f"{method.__name__} was called while this model runs a call on the same thread (from "
                             "one of its callbacks): one call at a time; open a second FlexGenLite for nested work")
        with self._running:
            self._caller = threading.get_ident()
            try:
                return method(self, *args, **kwargs)
            finally:
                self._caller = None
                if not self.closed:  # the planned block shape again (a narrower one's cache freed)
                    self.engine, self.policy = self.shapes.use(self.shapes.planned), self.shapes.planned

    return call


def default_workload(config: ModelConfig) -> Workload:
    """What policy="auto" plans for when told nothing: 512-token prompts, 32 new tokens, one block
    (shortened to fit the model's context). Longer prompts at generate time are checked against the budgets."""
    gen = min(32, config.max_positions // 4)
    return Workload(min(512, config.max_positions - gen), gen)


class FlexGenLite(BlockRuns):
    """A model placed over gpu / cpu / disk by a policy (by default searched for this machine).

    >>> m = FlexGenLite("path/to/opt-1.3b")  # policy="auto", planned for 512 + 32 tokens
    >>> m = FlexGenLite("path/to/opt-1.3b", policy=Policy(weight_gpu_percent=0, weight_cpu_percent=100))
    >>> m.generate("Paris is the capital of")
    """

    closed = False
    _caller: int | None = None  # the thread running a call (one_call)

    def __init__(self, model: str, policy: Policy | str | None = None, device: str | None = None,
                 progress: Callable[[str], None] | None = None, *, workload: Workload | None = None,
                 budgets: Budgets | None = None, hardware=None, trace=None) -> None:
        """policy: a Policy, or "auto" (the default) or an AutoPolicy: searched for `workload` (default
        `default_workload`) within `budgets`, using `hardware` or this machine's cached profile (measured on
        first use, ~35-55 s on 2 cores). Explicit budgets are checked
        for an explicit policy too; `self.search` keeps the auto policy's prediction. `trace`: a trace.Recorder
        that gets the engine's spans (--breakdown, --trace)."""
        self.config, source, self.tokenizer = open_model(model)
        self.device = ComputeDevice(device)
        self.search, self.budgets = None, budgets
        self._running = threading.Lock()  # one_call
        self._rss_before = process_rss()  # heap_limit: the runtime's share, beside the engine's budgets
        self.source_quantized = source_quantization(model)
        self.policy = self._resolve(policy, workload, budgets, hardware, progress, model)
        self.kept_as_stored = kept_as_stored(self.policy, model)
        searched = tuple(said for said, name, on in (  # the compressions the search chose, not a flag
            ("weights", "compress_weight", self.policy.compress_weight),
            ("KV cache", "compress_cache", self.policy.compress_cache))
            if self.search is not None and on and getattr(policy, name, None) is None)
        if (notice := compression_notice(self.policy, searched, self.source_quantized,
                                         self.kept_as_stored, kept_groups(self.policy, model))) is not None:
            print(notice, file=sys.stderr)
        self.dtype = compute_dtype(self.policy, self.device.device.type)
        keep_freed_memory()
        specs = layer_specs(self.config)
        compression = self.policy.weight_compression()
        cpu_rows = self.policy.gpu_batch_size if on_cpu(self.device) else 0  # weights.in_8_bits
        ends = [w for layer in specs for w in layer.weights if rounded_to_8_bits(w, compression, cpu_rows > 0)]
        if ends:
            stored = (f"stored so for decode steps of {cpu_rows} row(s)" if in_8_bits(ends[0], compression, cpu_rows,
                                                                                     self.dtype)
                      else f"held in {str(self.dtype).removeprefix('torch.')} for steps of {cpu_rows} rows")
            print(f"note: compressed weights on a CPU: {ends_notice(model)}, whatever the batch; {stored}",
                  file=sys.stderr)
        check_fits(planned_bytes(specs, self.policy.percents("weight"), self.dtype, compression, cpu_rows),
                   self.device, self.policy.offload_dir, f"the weights of {self.config.name}")
        if self.budgets is not None:
            self._check_budgets(workload, "the policy")
        self.ledger = MemoryLedger()
        self.disk = DiskStore(self.policy.offload_dir)
        try:
            report = (lambda i, n: progress(f"placing weights: layer {i}/{n}")) if progress else None
            weights = place_weights(specs, self.policy.percents("weight"), source, self.dtype, self.device,
                                    self.disk, self.ledger, self.policy.pin_weight, compression, report, cpu_rows)
        except BaseException:
            self.disk.close()
            raise
        return_freed_memory()  # placement's temporaries: not held as heap holes through the run
        self.engine = Engine(self.config, self.policy, specs, weights, self.device, self.dtype,
                             self.disk, self.ledger, trace or NULL)
        self.shapes = BlockShapes(self.engine)  # narrower blocks where a long prompt's would pass the budgets
        self.progress = progress
        self.score_stats = None

    def _resolve(self, policy, workload, budgets, hardware, progress, model: str) -> Policy:
        from .planning.policy_search import search_policy
        from .profiling.measure import load_profile

        if policy is None or policy == "auto":
            policy = AutoPolicy()
        if not isinstance(policy, Policy | AutoPolicy):
            raise PolicyError(f"policy must be a Policy, an AutoPolicy or 'auto', got {policy!r}")
        asked = policy.compress_weight if isinstance(policy, AutoPolicy) else None
        policy = for_model(policy, model)
        if isinstance(policy, Policy):
            return policy
        offload = policy.base.offload_dir
        self.budgets = (budgets or Budgets()).resolved(self.device, offload)
        hardware = hardware or load_profile(self.device, offload, progress=progress)
        workload = workload or default_workload(self.config)
        self.search = search_policy(self.config, workload, hardware, self.budgets, policy)
        if hint := kept_groups_hint(self.config, workload, hardware, self.budgets, policy, self.search, model, asked):
            print(hint, file=sys.stderr)
        return self.search.policy

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, prompts: str | list[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | tuple[str, ...] | list[str] = (), chat: bool = False, **rules) -> str | list[str]:
        """Completions of one prompt (a str) or many (a list); chat applies the model's chat template. stop: a
        string or several; an output ends before the first. rules: SamplingConfig's others (min_p,
        repetition_penalty, presence_penalty, frequency_penalty, logit_bias, min_tokens, stop_token_ids)."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed, stop, **rules)
        prompt_ids = self.encode(texts, chat)
        ids = self.generate_ids(prompt_ids, sampling)
        outputs = [self.decode(i, sampling.stop, p) for i, p in zip(ids, prompt_ids, strict=True)]
        return outputs[0] if single else outputs

    def encode(self, texts: list[str], chat: bool = False) -> list[list[int]]:
        return encode_texts(self.tokenizer, texts, chat, self.config.name)

    def decode(self, ids: list[int], stop: tuple[str, ...] = (), context: list[int] = ()) -> str:
        """The text of `ids` (special tokens skipped) after `context`, the tokens before them (their prompt's:
        completion_text.py), up to the first stop string in it."""
        return cut_at_stop(text_after(self.tokenizer, list(context), ids), stop)

    @one_call
    def generate_ids(self, prompts: list[list[int]], sampling: SamplingConfig | list[SamplingConfig] | None = None,
                     return_logits: bool = False, indices: list[int] | None = None,
                     on_tokens: Callable[[int, list[int]], None] | None = None,
                     on_block: Callable[[dict[int, tuple[list[int], torch.Tensor | None]]], None] | None = None,
                     carry_over: bool | None = None, cancelled: Callable[[int], bool] | None = None,
                     deferred: Callable[[int], bool] | None = None, logprobs: list[int | None] | None = None):
        """Generated token ids (prompt excluded) for each prompt, in the order given.

        sampling: one SamplingConfig for all, or one per prompt (rows of a block may differ in every setting). With
        return_logits, also each prompt's fp32 logits per generated token, (tokens, vocab). indices: the prompts'
        places in a larger input (default 0, 1, ...); with a seed, they seed sampling. on_tokens(i, ids): after each
        step, for each prompt i of the running block, its tokens so far (streaming). on_block({i: (ids, logits or
        None)}): after each block, the prompts it finished (to save them before the next block runs). carry_over: a
        block whose few last rows still generate while others wait ends early and those rows go on in a later block
        (stragglers.py): None where measured worth it, False never, True wherever few are left. cancelled(i): prompt
        i is no longer wanted (its client left, its batch was cancelled): asked before each block and after each
        step, its row stops there and on_block never gets it (its ids: what it had generated). deferred(i): asked
        before each block for the prompts yet to start, those for which it is true are not run (their ids empty, not
        given to on_block): the caller runs them later. logprobs (instead of return_logits): for each prompt, None or
        k: per generated token, its log-probability and the k likeliest tokens' [(id, log-probability)], kept as the
        block runs (a few numbers a token, where logits hold the vocabulary's), given where logits would be."""
        self._check_open()
        prompts = id_lists(prompts)
        if indices is not None and len(indices) != len(prompts):
            raise ValueError(f"indices has {len(indices)} places for {len(prompts)} prompts")
        if logprobs is not None and (return_logits or len(logprobs) != len(prompts)):
            raise ValueError("logprobs: one entry (None or a count) per prompt, and not with return_logits")
        sampling, configs = per_prompt(sampling or SamplingConfig(), len(prompts))
        limits = [c.max_new_tokens for c in configs]
        self._check_prompts(prompts, limits)
        self._check_token_ids(configs)
        if any(c.stop for c in configs) and self.tokenizer is None:
            raise ModelError("stop strings need a tokenizer; this model has none")
        if any(c.guided for c in configs) and self.tokenizer is None:
            raise ModelError("a guided output (choice, regex, JSON) needs a tokenizer; this model has none")
        order = block_order(prompts, self.policy.share_prefix)  # similar lengths (and instructions) share a block
        results: list[list[int]] = [[] for _ in prompts]
        logits: list[torch.Tensor] = [None] * len(prompts)
        size = self.policy.block_size
        queue = [order[first:first + size] for first in range(0, len(order), size)]
        carried: dict[int, Carried] = {}
        bound = max(len(p) + n for p, n in zip(prompts, limits, strict=True))  # positions a block was planned for
        done = 0
        while queue or carried:
            if cancelled is not None or deferred is not None:
                queue = [[i for i in group if not (cancelled and cancelled(i)) and not (deferred and deferred(i))]
                         for group in queue]
                queue = [group for group in queue if group]
                carried = {i: c for i, c in carried.items() if not (cancelled and cancelled(i))}
                if not (queue or carried):
                    break
            chosen = queue.pop(0) if queue else next_group(
                list(carried), {i: len(prompts[i]) + len(carried[i].tokens) for i in carried},
                {i: limits[i] - len(carried[i].tokens) for i in carried}, size, bound)
            made = [len(carried[i].tokens) if i in carried else 0 for i in chosen]
            rows = self.block_rows([len(prompts[i]) + n for i, n in zip(chosen, made, strict=True)],
                                   max(limits[i] - n for i, n in zip(chosen, made, strict=True)))
            if rows < len(chosen) and chosen[0] not in carried:
                queue.insert(0, chosen[rows:])  # the rest: a block of their own next (carried rows stay carried)
            chosen = chosen[:rows]
            moving = {row: carried.pop(i) for row, i in enumerate(chosen) if i in carried}
            done += 1
            label = f"block {done}/{done + len(queue) + bool(carried)}"
            sharing = functools.partial(later_rows, blocks=len(queue), waiting=len(carried), size=size)
            block = self._run_block([prompts[i] + (moving[row].tokens if row in moving else [])
                                     for row, i in enumerate(chosen)], sampling, return_logits,
                                    [configs[i] for i in chosen],
                                    chosen if indices is None else [indices[i] for i in chosen], label,
                                    on_tokens and streamer(chosen, moving, on_tokens), moving,
                                    sharing if carry_over is not False else None, carry_over,
                                    cancelled and (lambda row, chosen=chosen: cancelled(chosen[row])),
                                    logprobs and [logprobs[i] for i in chosen])
            finished = {}
            for row, i in enumerate(chosen):
                before = moving.get(row, Carried([]))
                part = (torch.stack([s[row] for s in self.engine.logits])[:int(block.length[row])]
                        if return_logits else None)
                kept = block.row_logprobs[row] if block.row_logprobs is not None else []  # carried ones first
                tokens = before.tokens + block.new_tokens(row)
                if block.stopped and not bool(block.finished[row]):
                    generator = block.generators[row] if block.generators is not None else None
                    carried[i] = Carried(tokens, before.logits + ([part] if part is not None else []), generator, kept)
                    continue
                results[i] = tokens
                if return_logits:
                    logits[i] = torch.cat(before.logits + [part])
                elif logprobs is not None and logprobs[i] is not None:
                    logits[i] = kept
                if cancelled is None or not cancelled(i):
                    finished[i] = (results[i], logits[i])
            if on_block is not None and finished:
                on_block(finished)
            if self.progress:
                self.progress(f"{label} done" + (f" ({len(chosen) - len(finished)} rows carried on)"
                                                 if block.stopped else ""))
        return (results, logits) if return_logits or logprobs is not None else results

    # ---- scoring (engine/scoring.py) --------------------------------------------------------------------
    @one_call
    def score(self, requests: list[tuple[list[int], list[int]]], max_len: int | None = None
              ) -> list[tuple[float, bool]]:
        """(log p(continuation | context) summed, whether greedy decoding gives the continuation) for each
        (context ids, continuation ids): prefill-only blocks through the engine, no generation; a request past
        `max_len` tokens (default and at most: the model's context) cut from the left, as lm-eval's hf model does.
        `self.score_stats` then says how many tokens went through in how long."""
        from .engine.scoring import score_requests

        self._check_open()
        return score_requests(self, requests, max_len=max_len)

    @one_call
    def prompt_logprobs(self, prompts: list[list[int]], top: int = 0
                        ) -> list[list[tuple[float, list[tuple[int, float]]] | None]]:
        """Per prompt (ids), per token: None for the first, then (log p(token | the tokens before), the `top`
        likeliest tokens there as (id, log-probability)): prefill-only blocks, as `score`."""
        from .engine.scoring import prompt_logprobs

        self._check_open()
        return prompt_logprobs(self, prompts, top)

    @one_call
    def loglikelihood_rolling(self, documents: list[list[int]], prefix_token: int | None = None) -> list[float]:
        """The log-likelihood of each whole document (ids), in windows of up to the model's context."""
        from .engine.scoring import loglikelihood_rolling

        self._check_open()
        return loglikelihood_rolling(self, documents, prefix_token)

    def _check_prompts(self, prompts: list[list[int]], limits: list[int]) -> None:
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if any(type(t) is not int for t in p):  # not bools, floats or numpy scalars (their lists: tolist())
                raise ValueError(f"prompt {i} must be token ids (Python ints), got {str(p)[:60]}")
            if len(p) + limits[i] > self.config.max_positions:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={limits[i]} that exceeds "
                    f"the model's context of {self.config.context}: shorten the prompt or "
                    "generate fewer tokens")
            if max(p) >= self.config.vocab_size or min(p) < 0:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary (0..{self.config.vocab_size - 1})")

    def _check_token_ids(self, configs: list[SamplingConfig]) -> None:
        vocab = self.config.vocab_size
        for i, c in enumerate(configs):
            if any(t >= vocab for t in c.token_ids()):
                raise ValueError(f"prompt {i}'s logit_bias or stop_token_ids names a token outside the vocabulary "
                                 f"(0..{vocab - 1})")

    # ---- lifetime --------------------------------------------------------------------------------
    def memory_report(self) -> dict[str, dict[str, int]]:
        return {"current": dict(self.ledger.current), "peak": dict(self.ledger.peak)}

    def close(self) -> None:
        """End the engine's threads, remove its offload files, and give its memory back: weights, cache and
        buffers freed, and where budgets were given (or resolved by policy="auto") their pages returned to the OS
        (freed memory is otherwise kept, keep_freed_memory), so that a model opened next has the budgets' room."""
        if self.closed:
            return
        self.closed = True
        self.shapes.close()
        self.disk.close()
        self.engine = None
        self.ledger.current.update(dict.fromkeys(self.ledger.current, 0))  # memory_report: nothing held now
        if self.budgets is not None:  # budgets are promises (auto's too): a model opened next has their room
            gc.collect()  # the engine's reference cycles (threads' closures) hold its tensors until collected
            return_freed_memory()  # (~0.1 s: not paid where nothing was promised; a test suite closes hundreds)
            if self.device.is_cuda:
                torch.cuda.empty_cache()  # torch's cached blocks too: a model opened next measures what is free

    def _check_open(self) -> None:
        if self.closed:
            raise ModelError(f"this FlexGenLite ({self.config.name}) was closed: open the model again to use it")

    def __enter__(self) -> FlexGenLite:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def id_lists(prompts) -> list[list[int]]:
    """Prompts as lists of token ids: lists as given; tuples, numpy arrays and 1-D tensors each, or one 2-D
    tensor or array, converted."""
    if hasattr(prompts, "tolist") and getattr(prompts, "ndim", 1) == 2:
        return prompts.tolist()
    if isinstance(prompts, (str, bytes)) or hasattr(prompts, "tolist"):
        raise ValueError("prompts must be lists of token ids (or a 2-D tensor of them); give text to generate()")
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        raise ValueError("prompts must be a list of prompts, each a list of token ids: wrap one prompt's ids in a "
                         "list, [[...]]")
    return [p if type(p) is list else p.tolist() if hasattr(p, "tolist") else list(p) for p in prompts]


def encode_texts(tokenizer, texts: list[str], chat: bool, name: str, system: str | None = None) -> list[list[int]]:
    """Token ids of each text (wrapped in the chat template with `chat`, after a `system` message if given)."""
    if tokenizer is None:
        raise ModelError(f"{name} has no tokenizer (dummy weights, or none among its files): add the "
                         "model's tokenizer files (tokenizer.json, tokenizer_config.json), or pass token ids "
                         "(FlexGenLite.generate_ids)")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError(f"{name} has no chat template; drop --chat")
        before = [{"role": "system", "content": system}] if system is not None else []
        texts = [tokenizer.apply_chat_template([*before, {"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(t)["input_ids"] for t in texts]

