"""The replicas: Ray Data callable classes whose constructor opens the model once and whose `__call__` answers a
batch of rows (a dict of columns) through the engine's blocks. Plain Python: they run without Ray too."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from ..cli.run_record import policy_record
from ..openai_api.batch_lines import answer_line, check_request
from ..openai_api.protocol import CHAT, COMPLETIONS
from ..openai_api.requests import RequestError, Served, Work, prepare
from ..openai_api.runner import run_jobs
from .config import ROW_FIELDS, ReplicaConfig, Sampling

OUTPUT_COLUMNS = ("generated_text", "generated_tokens", "finish_reason", "num_input_tokens", "num_generated_tokens")


class Replica:
    """One model, opened once per actor (a restarted actor opens it again)."""

    def __init__(self, config: ReplicaConfig) -> None:
        import torch

        from ..generation import FlexGenLite

        if config.threads:
            torch.set_num_threads(config.threads)
        self.model = FlexGenLite(config.model, policy=config.policy, device=config.device, workload=config.workload,
                                 budgets=config.budgets)
        self.served = Served(config.name, self.model.config, self.model.tokenizer)

    def pid(self) -> int:
        return os.getpid()


class PromptReplica(Replica):
    """Rows with `prompt` (text) or `messages` (chat) and optional sampling columns in; the same rows out with
    generated_text, generated_tokens, finish_reason, num_input_tokens and num_generated_tokens beside them."""

    def __init__(self, config: ReplicaConfig, sampling: Sampling | None = None) -> None:
        super().__init__(config)
        self.defaults = (sampling or Sampling()).body()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = len(next(iter(batch.values())))
        works = [self._work(batch, r) for r in range(rows)]
        outputs = run_jobs(self.model, [w.jobs[0] for w in works])
        # nested columns (messages, stop) as Python lists, which Arrow stores as lists of structs, not pickles
        out = {k: [plain(v) for v in c] if getattr(c, "dtype", None) == np.dtype(object) else c
               for k, c in batch.items()}
        out["generated_text"] = [o.text for o in outputs]
        out["generated_tokens"] = [list(o.token_ids) for o in outputs]
        out["finish_reason"] = [o.finish_reason for o in outputs]
        out["num_input_tokens"] = [w.prompt_tokens for w in works]
        out["num_generated_tokens"] = [len(o.token_ids) for o in outputs]
        return out

    def _work(self, batch: dict[str, Any], row: int) -> Work:
        body = dict(self.defaults)
        for name in ROW_FIELDS:
            value = plain(batch[name][row]) if name in batch else None
            if value is not None:
                body[name] = value
        messages = plain(batch["messages"][row]) if "messages" in batch else None
        prompt = plain(batch["prompt"][row]) if "prompt" in batch else None
        if messages is not None:
            url, body["messages"] = CHAT, messages
        elif isinstance(prompt, str):
            url, body["prompt"] = COMPLETIONS, prompt
        else:
            raise ValueError(f"row {row} of the batch has neither a `prompt` string nor `messages`: {prompt!r}")
        try:
            return prepare(url, body, self.served)
        except RequestError as e:
            raise ValueError(f"row {row} of the batch ({'messages' if url == CHAT else 'prompt'} "
                             f"{str(body.get('prompt', messages))[:60]!r}) cannot be served: {e.message}") from None


class BatchLineReplica(Replica):
    """`run-batch --ray`: rows of one chunk each (`indices`, `lines`: OpenAI batch lines, checked by the driver)
    in; one row per line out: its `index`, its output line as JSON (`record`), this replica's `pid` and its
    engine's policy as the output file records it (`policy`, JSON)."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        indices, lines = [], []
        for chunk_indices, chunk_lines in zip(batch["indices"], batch["lines"], strict=True):
            indices += [int(i) for i in chunk_indices]
            lines += [str(t) for t in chunk_lines]
        checked = [check_request(text, self.served) for text in lines]
        works = [w for _, w in checked if isinstance(w, Work)]
        outputs = iter(run_jobs(self.model, [j for w in works for j in w.jobs]))
        records = []
        for custom_id, work in checked:
            if isinstance(work, Work):
                work = answer_line(custom_id, work, [next(outputs) for _ in work.jobs])
            records.append(json.dumps(work))
        policy = json.dumps(policy_record(self.model.policy, str(self.model.dtype).removeprefix("torch.")))
        return {"index": indices, "record": records, "pid": [os.getpid()] * len(indices),
                "policy": [policy] * len(indices)}


def plain(value: Any) -> Any:
    """A cell of a Ray Data batch as plain Python: None for null and NaN, lists for arrays, dicts kept."""
    if value is None or (isinstance(value, float | np.floating) and math.isnan(value)):
        return None
    if isinstance(value, np.ndarray | list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value
