"""The replicas: Ray Data callable classes whose constructor opens the model once and whose `__call__` answers a
batch of rows through the engine's blocks: an Arrow table, as Ray Data hands it (its columns' types, nulls
included, kept in the rows out), or a dict of columns (numpy arrays or lists: they run without Ray too)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import pyarrow as pa

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


ID_COLUMNS = ("custom_id", "id", "index", "doc_id")  # columns that name a row, in a failed row's message


class PromptReplica(Replica):
    """Rows with `prompt` (text) or `messages` (chat) and optional sampling columns in; the same rows out with
    generated_text, generated_tokens, finish_reason, num_input_tokens and num_generated_tokens beside them."""

    def __init__(self, config: ReplicaConfig, sampling: Sampling | None = None) -> None:
        super().__init__(config)
        self.defaults = (sampling or Sampling()).body()

    def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table | dict[str, Any]:
        columns = plain_columns(batch)
        works = [self._work(columns, r) for r in range(len(next(iter(columns.values()))))]
        outputs = run_jobs(self.model, [w.jobs[0] for w in works])
        out = {"generated_text": [o.text for o in outputs],
               "generated_tokens": [list(o.token_ids) for o in outputs],
               "finish_reason": [o.finish_reason for o in outputs],
               "num_input_tokens": [w.prompt_tokens for w in works],
               "num_generated_tokens": [len(o.token_ids) for o in outputs]}
        if isinstance(batch, pa.Table):  # the rows' own columns as they came (an int column with nulls stays ints)
            for name, values in out.items():
                batch = batch.append_column(name, pa.array(values))
            return batch
        return columns | out

    def _work(self, columns: dict[str, list], row: int) -> Work:
        body = dict(self.defaults)
        for name in ROW_FIELDS:
            value = columns[name][row] if name in columns else None
            if value is not None:
                body[name] = value
        messages = columns["messages"][row] if "messages" in columns else None
        prompt = columns["prompt"][row] if "prompt" in columns else None
        if messages is not None:
            url, body["messages"] = CHAT, messages
        elif isinstance(prompt, str):
            url, body["prompt"] = COMPLETIONS, prompt
        else:
            raise ValueError(f"row {row} of the batch has neither a `prompt` string nor `messages`: {prompt!r}")
        try:
            return prepare(url, body, self.served)
        except RequestError as e:
            named = [f"{key} {columns[key][row]!r}" for key in ID_COLUMNS if key in columns]  # a batch's row number
            # is not the dataset's (helper-43): its own id column names it, where it has one
            raise ValueError(f"{' '.join(named[:1]) or f'row {row} of a batch'} "
                             f"({'messages' if url == CHAT else 'prompt'} {str(body.get('prompt', messages))[:60]!r})"
                             f" cannot be served: {e.message}") from None


class BatchLineReplica(Replica):
    """`run-batch --ray`: rows of one chunk each (`indices`, `lines`: OpenAI batch lines, checked by the driver)
    in; one row per line out: its `index`, its output line as JSON (`record`), this replica's `pid` and its
    engine's policy as the output file records it (`policy`, JSON)."""

    def __call__(self, batch: pa.Table | dict[str, Any]) -> dict[str, Any]:
        indices, lines, columns = [], [], plain_columns(batch)
        for chunk_indices, chunk_lines in zip(columns["indices"], columns["lines"], strict=True):
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


def plain_columns(batch: pa.Table | dict[str, Any]) -> dict[str, list]:
    """A batch's columns as lists of plain Python values (None for nulls and NaN)."""
    if isinstance(batch, pa.Table):
        return {name: [plain(v) for v in batch.column(name).to_pylist()] for name in batch.column_names}
    return {name: [plain(v) for v in column] for name, column in batch.items()}


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
