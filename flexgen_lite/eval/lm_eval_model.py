"""An lm-eval 0.4 model over FlexGen-Lite: `loglikelihood` and `loglikelihood_rolling` as prefill-only blocks
through the engine (engine/scoring.py), `generate_until` through `generate_ids`, under any policy.

    lm_eval.simple_evaluate(model=FlexGenLiteLM("path/to/model", policy="auto", compress_weight=True), tasks=...)
    python -m flexgen_lite.eval --model flexgen-lite --model_args pretrained=PATH,percent=0/100/100/0/100/0 ...

model_args are the CLI's policy flags with underscores (policy, percent as six numbers joined by '/',
gpu_batch_size, num_gpu_batches, compress_weight, compress_cache, cpu_cache_compute, dtype, device, offload_dir,
gpu_mem, cpu_mem, disk_mem, ...), plus max_length (default: the model's context)."""

from __future__ import annotations

import argparse
import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, postprocess_generated_text
from tqdm import tqdm

from ..cli.options import add_policy_flags, budgets_from_args, policy_from_args
from ..engine.scoring import rolling_windows
from ..generation import FlexGenLite, default_workload
from ..kernels.sampling import SamplingConfig
from ..model_source import model_config
from ..planning.policy_search import AutoPolicy

# lm-eval passes these to every model; the engine's block (gpu_batch_size x num_gpu_batches) is its batch
IGNORED = ("batch_size", "max_batch_size")


def policy_argv(options: dict) -> list[str]:
    """model_args as the CLI's flags: key=value -> --key value, True -> --key, False -> --no-key."""
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        elif key == "percent":
            argv += [flag, *str(value).replace("/", " ").split()]
        else:
            argv += [flag, str(value)]
    return argv


def parse_model_args(options: dict) -> argparse.Namespace:
    """The policy flags of `options`; a bad one ends in the parser's `error:` line and exit code 2."""
    parser = argparse.ArgumentParser(prog="flexgen-lite (lm-eval model_args)", add_help=False)
    add_policy_flags(parser)
    return parser.parse_args(policy_argv(options))


@register_model("flexgen-lite", "flexgen_lite")
class FlexGenLiteLM(TemplateLM):
    """FlexGen-Lite as an lm-eval model: requests run in blocks of the policy's size, sorted by length."""

    def __init__(self, pretrained: str, max_length: int | None = None, progress: bool = True, **options) -> None:
        super().__init__()
        for key in IGNORED:
            options.pop(key, None)
        device = options.get("device")
        if device in ("", None) or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            options.pop("device", None)  # lm-eval's own default is cuda, whether or not there is one
        args = parse_model_args(options)
        policy = policy_from_args(args, 8)
        # auto plans for generation's default lengths; an explicit policy is checked per block at its rows'
        # real lengths (scoring rows are mostly far shorter than 512 + 32)
        workload = default_workload(model_config(str(pretrained))) if isinstance(policy, AutoPolicy) else None
        self.model = FlexGenLite(str(pretrained), policy=policy, device=args.device,
                                 progress=self._report if progress else None, workload=workload,
                                 budgets=budgets_from_args(args))
        if self.model.tokenizer is None:
            raise ValueError(f"{pretrained} has no tokenizer: lm-eval needs text")
        self.tokenizer = self.model.tokenizer
        context = self.model.config.max_positions
        self._max_length = min(int(max_length or context), context)
        if self._max_length < int(max_length or context):  # windows past it would be cut: targets lost
            print(f"flexgen-lite: max_length={max_length} exceeds {self.model.config.name}'s context of {context} "
                  f"positions: using {context}", file=sys.stderr)

    @staticmethod
    def _report(message: str) -> None:
        print(f"flexgen-lite: {message}", file=sys.stderr, flush=True)

    # ---- chat templates (--apply_chat_template), as lm-eval's hf model applies them -------------------------
    @property
    def tokenizer_name(self) -> str:
        """What lm-eval's request cache keys templated prompts by."""
        return str(self.tokenizer.name_or_path or self.model.config.name).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """As lm-eval's hf model: a template that refuses a system message (Gemma's) is applied without it
        (helper-43: the whole --system_instruction run failed)."""
        from jinja2.exceptions import TemplateError

        def render(history):
            return self.tokenizer.apply_chat_template(history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)
        try:
            return render(chat_history)
        except TemplateError:
            without = [m for m in chat_history if m.get("role") != "system"]
            if len(without) == len(chat_history):
                raise
            return render(without)

    # ---- tokens, as lm-eval's hf model makes them --------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ---- requests ----------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = self.model.score(pairs, max_len=self.max_length) if pairs else []
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for window in rolling_windows(self.tok_encode(string), self.prefix_token_id, self.max_length):
                windows.append(window)
                owner.append(i)
        sums = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.model.score(windows, max_len=self.max_length) if windows else [],
                                   strict=True):
            sums[i] += logprob
        for req, total in zip(requests, sums, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return sums

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations cut at the first stop sequence; all in one engine call,
        in blocks (requests' settings may differ row by row)."""
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        prompts, samplings, stops = [], [], []
        for req in requests:
            kwargs = dict(req.args[1])
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks))
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for a context in {self.max_length} positions")
            temperature = kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0
            samplings.append(SamplingConfig(max_gen, temperature, int(kwargs.get("top_k", 0) or 0),
                                            float(kwargs.get("top_p", 1.0) or 1.0), kwargs.get("seed"),
                                            tuple(s for s in until if s),
                                            repetition_penalty=_number(kwargs, "repetition_penalty", 1.0),
                                            min_p=_number(kwargs, "min_p", 0.0)))
            prompts.append(self.tok_encode(req.args[0])[-(self.max_length - max_gen):] or [self.prefix_token_id])
            stops.append(until)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="flexgen-lite generate_until")

        def finished(block: dict) -> None:
            for i, (out, _) in block.items():
                results[i] = postprocess_generated_text(self.tok_decode(out), stops[i], None)
                self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
            bar.update(len(block))

        if requests:
            self.model.generate_ids(prompts, samplings, on_block=finished)
        bar.close()
        return results


def _number(kwargs: dict, name: str, default: float) -> float:
    """A generation kwarg as a number (None: its default; 0 stays 0, for SamplingConfig to refuse where it must)."""
    value = kwargs.get(name)
    return default if value is None else float(value)
