"""Local lm-eval tasks over JSONL files written by the tests (no network): multiple choice, generation, rolling
log-likelihood. Generations are compared without their leading whitespace, as generation tasks filter them: lm-eval's
hf model decodes a continuation alone, an OpenAI server (vLLM's, ours) as the prompt's continuation, which keeps the
space a word-level or SentencePiece tokenizer puts before its first word."""

from __future__ import annotations

import json
import random
from pathlib import Path

TASKS = {
    "local_mc": """
task: local_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/mc.jsonl}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "local_gen": """
task: local_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/gen.jsonl}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["{stop}"], max_gen_toks: {max_gen}, do_sample: false}}
filter_list:
  - name: none
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
""",
    "local_ppl": """
task: local_ppl
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/ppl.jsonl}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
}


def word_docs(seed: int = 0, n: int = 12) -> dict[str, list[dict]]:
    """Documents over the tiny models' word vocabulary (w0..w511)."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(3, 512)}" for _ in range(k))

    mc = [{"question": words(rng.randrange(2, 12)), "choices": [words(rng.randrange(1, 4)) for _ in range(4)],
           "label": rng.randrange(4)} for _ in range(n)]
    gen = [{"question": words(rng.randrange(2, 12)), "answer": words(2)} for _ in range(n)]
    ppl = [{"text": words(k)} for k in (5, 40, 150)]
    return {"mc": mc, "gen": gen, "ppl": ppl}


ENGLISH = {
    "mc": [
        {"question": "The capital of France is", "choices": [" Paris", " Berlin", " Madrid", " Rome"], "label": 0},
        {"question": "Water freezes at a temperature of", "choices": [" 0 degrees", " 50 degrees", " 100 degrees",
                                                                      " 200 degrees"], "label": 0},
        {"question": "The largest planet in our solar system is", "choices": [" Jupiter", " Mars", " Venus",
                                                                              " Mercury"], "label": 0},
        {"question": "A cat is a kind of", "choices": [" animal", " vegetable", " mineral", " machine"], "label": 0},
        {"question": "Two plus two equals", "choices": [" four", " five", " three", " ten"], "label": 0},
        {"question": "The sun rises in the", "choices": [" east", " west", " north", " south"], "label": 0},
    ],
    "gen": [
        {"question": "Q: What is the capital of France?\nA:", "answer": " Paris"},
        {"question": "Q: What color is the sky on a clear day?\nA:", "answer": " Blue"},
        {"question": "Q: How many days are in a week?\nA:", "answer": " Seven"},
        {"question": "Q: What is 3 + 4?\nA:", "answer": " 7"},
    ],
    "ppl": [{"text": "The quick brown fox jumps over the lazy dog. " * 3},
            {"text": "Once upon a time, there was a little girl who lived in a village near the forest."}],
}


def write_tasks(folder: Path, docs: dict[str, list[dict]], stop: str, max_gen: int) -> Path:
    """The three tasks' YAML and JSONL files in `folder`; returns it (lm-eval's include_path)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in docs.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for task, text in TASKS.items():
        (folder / f"{task}.yaml").write_text(text.format(data=folder, stop=stop.replace("\n", "\\n"),
                                                         max_gen=max_gen))
    return folder
