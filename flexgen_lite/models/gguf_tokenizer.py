"""A GGUF file's tokenizer (with its chat template), built by transformers' own GGUF conversion and cached."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from .gguf_file import GGUFError, _meta, _open


def _tokenizer_cache_dir(path: str) -> str:
    from ..system.paths import cache_dir

    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return str(cache_dir() / f"tokenizer-{key}")


def gguf_tokenizer(path: str | os.PathLike[str]) -> Any | None:
    """A ``PreTrainedTokenizerFast`` (with chat template) built from the GGUF metadata.

    Uses transformers' own GGUF tokenizer conversion (offline), then keeps the result in the user's
    cache directory: converting takes seconds, loading the saved tokenizer a fraction of one. None for a file
    without tokenizer metadata (token ids in and out, as for dummy weights).
    """
    path, reader = _open(path)
    if "tokenizer.ggml.model" not in reader.metadata:
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cached = _tokenizer_cache_dir(path)
    if os.path.isfile(os.path.join(cached, "tokenizer.json")):
        try:  # the saved tokenizer.json as it is: a model's own class (Qwen2's, Gemma's) rebuilds its pre-tokenizer
            return PreTrainedTokenizerFast.from_pretrained(cached, local_files_only=True)
        except Exception:  # a damaged cache entry: rebuild it below
            pass
    template = _meta(reader, path, "tokenizer.chat_template", None)
    try:
        tok = AutoTokenizer.from_pretrained(
            os.path.dirname(path),
            gguf_file=os.path.basename(path),
            local_files_only=True,
        )
    except Exception as exc:
        raise GGUFError(
            f"{path}: cannot build a tokenizer from the GGUF metadata: {type(exc).__name__}: {exc}"
        ) from exc
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    try:
        tok.save_pretrained(cached)
    except OSError:
        pass  # no writable cache: convert again next time
    return tok
