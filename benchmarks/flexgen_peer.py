"""The original FlexGen (`flexgen` 0.1.8 from the package registry) as the suite's peer: its own benchmark,
`flexgen.flex_opt.run_flexgen`, with dummy weights and no hub.

    python benchmarks/flexgen_peer.py --model facebook/opt-13b --percent 0 100 100 0 100 0 \
        --gpu-batch-size 32 --num-gpu-batches 4 [--compress-weight] [--cpu-cache-compute]

The flags are flex_opt's; `--path _DUMMY_`, a temporary `--offload-dir` and `--log-file` are added.
flex_opt asks the hub for OPT's tokenizer, only to encode one fixed prompt padded to --prompt-len (left) and,
with real weights, to decode: `AutoTokenizer.from_pretrained` answers here with a word-level stand-in built in
this process (pad 1, bos 2 as OPT's). Prints FlexGen's output and its log lines; exits SKIP_RC with
"SKIP: reason" as the last line of stderr where FlexGen cannot run (no CUDA: it hard-codes cuda:0; flexgen not
installed; a model flex_opt does not know). gpu_suite.py reads the figures with parse_log.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

SKIP_RC = 77
REPO = Path(__file__).resolve().parent.parent
PROMPT = "Paris is the capital city of"  # flex_opt's get_test_inputs

_LOG_FIELDS = {  # FlexGen's write_benchmark_log, field: (regex, key)
    "model_gb": r"model size: ([\d.]+) GB",
    "cache_gb": r"cache size: ([\d.]+) GB",
    "peak_gpu_gb": r"peak gpu mem: ([\d.]+) GB",
    "prefill_s": r"prefill latency: ([\d.]+) s",
    "prefill_tok_s": r"prefill throughput: ([\d.]+) token/s",
    "decode_s": r"decode latency: ([\d.]+) s",
    "decode_tok_s": r"decode throughput: ([\d.]+) token/s",
    "total_s": r"total latency: ([\d.]+) s",
    "total_tok_s": r"total throughput: ([\d.]+) token/s",
}


def parse_log(text: str) -> dict | None:
    """FlexGen's benchmark figures from its output (the last run's, if several), or None without a total."""
    found = {}
    for key, pattern in _LOG_FIELDS.items():
        values = re.findall(pattern, text)
        if values:
            found[key] = float(values[-1])
    projected = re.findall(r"projected: (True|False)", text)
    if "total_tok_s" not in found:
        return None
    found["projected"] = projected[-1] == "True" if projected else None
    return found


def standin_tokenizer(padding_side: str = "left"):
    """A tokenizer flex_opt can use in place of OPT's: the prompt's words, OPT's special ids (pad 1, bos 2
    prepended), padding to max_length on the left. Dummy weights need no real vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: 100 + i for i, w in enumerate(dict.fromkeys(PROMPT.split()))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side=padding_side)


class StandInAutoTokenizer:
    """What flex_opt calls as AutoTokenizer: from_pretrained(name, padding_side=...) without the hub."""

    @staticmethod
    def from_pretrained(name: str, **kwargs):
        return standin_tokenizer(kwargs.get("padding_side", "left"))


def skip(reason: str) -> int:
    print(f"SKIP: {reason}", file=sys.stderr, flush=True)
    return SKIP_RC


def import_flexgen():
    """flexgen.flex_opt: installed, else from a carried wheel in .whl/ (pure Python: importable as a zip)."""
    try:
        import flexgen.flex_opt as flex_opt
    except ImportError:
        wheels = sorted((REPO / ".whl").glob("flexgen-*.whl"))
        if not wheels:
            raise
        sys.path.insert(0, str(wheels[-1]))
        import flexgen.flex_opt as flex_opt
    return flex_opt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        flex_opt = import_flexgen()
    except ImportError as e:
        return skip(f"flexgen is not importable ({e}): bring .whl/flexgen-0.1.8-py3-none-any.whl")
    import argparse

    flex_opt.AutoTokenizer = StandInAutoTokenizer
    fill_dummy_weights_in_place(flex_opt)
    parser = argparse.ArgumentParser()
    flex_opt.add_parser_arguments(parser)
    with tempfile.TemporaryDirectory(prefix="flexgen-peer-") as work:  # its offload files and log, removed after
        return run(flex_opt, parser.parse_args(["--path", "_DUMMY_", "--offload-dir", f"{work}/offload",
                                                "--log-file", f"{work}/flexgen.log", *argv]))


def fill_dummy_weights_in_place(flex_opt) -> None:
    """FlexGen makes each dummy weight as np.ones(shape) and copies it into the tensor at its home: a second pass over
    tens of GB of fresh host memory (OPT-30B's paper policy: 48 GB) before its benchmark starts, and for a GPU home a
    pageable copy (0.1 s against 1.3 s per 512 MB on a 2-core VM). Here its init_weight_list gets the ones as a
    one-element view broadcast to the shape, and a tensor in CPU or GPU memory is filled with that value in place:
    the same weights, written once. What FlexGen times (its generation, after a warm-up) is untouched."""
    import warnings

    import numpy as np
    from flexgen.pytorch_backend import DeviceType, TorchTensor

    if getattr(flex_opt.init_weight_list, "fills_in_place", False):
        return
    make, load = flex_opt.init_weight_list, TorchTensor.load_from_np

    class Ones:  # numpy, but ones() a broadcast view
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def ones(shape, dtype=None):
            return np.broadcast_to(np.ones(1, dtype), shape)

    def init_weight_list(weight_specs, policy, env):
        flex_opt.np = Ones()
        try:
            return make(weight_specs, policy, env)
        finally:
            flex_opt.np = np

    def load_from_np(self, array):
        if array.size and not any(array.strides) and self.device.device_type in (DeviceType.CPU, DeviceType.CUDA):
            self.data.fill_(array.flat[0].item())
            return
        with warnings.catch_warnings():  # torch.from_numpy of a read-only view: FlexGen only reads it
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            load(self, array)

    init_weight_list.fills_in_place = True
    flex_opt.init_weight_list, TorchTensor.load_from_np = init_weight_list, load_from_np


def run(flex_opt, args) -> int:
    """FlexGen's own benchmark (flex_opt.run_flexgen) for `args`, its log printed; a skip where it cannot run."""
    import torch

    try:
        flex_opt.get_opt_config(args.model)
    except Exception as e:  # flex_opt raises ValueError("Invalid model name: ...") for what it does not know
        return skip(f"flex_opt knows no model {args.model!r} ({e})")
    ids = flex_opt.get_test_inputs(args.prompt_len, 1, StandInAutoTokenizer.from_pretrained("opt"))[0]
    if len(ids) != args.prompt_len or ids[-1] == 1:
        raise SystemExit(f"the stand-in tokenizer gave {len(ids)} ids ending {ids[-3:]}, not {args.prompt_len} "
                         "left-padded")
    if not torch.cuda.is_available():
        return skip("no CUDA: FlexGen hard-codes cuda:0 (TorchDevice('cuda:0'), torch.cuda.Stream)")
    flex_opt.run_flexgen(args)
    log = Path(args.log_file)
    if log.is_file():
        print("--- flexgen log ---\n" + log.read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
