"""The lm-eval model (flexgen_lite/eval): on local tasks, the same scores as `lm-eval --model hf` on the same
model and data, to the last digit (fp32).

Cost (CI runs these, with the [eval] extra): the task files are written once per module and indexed alone
(lm-eval's own index of its thousands of task files takes ~6 s each time); one lm-eval run of the three tasks per
model and side; the command line runs in this process."""

from __future__ import annotations

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval[hf]: its hf model, the reference

import torch  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from flexgen_lite.eval.lm_eval_model import FlexGenLiteLM  # noqa: E402

from .lm_eval_tasks import ENGLISH, word_docs, write_tasks  # noqa: E402

TASK_NAMES = ["local_mc", "local_gen", "local_ppl"]
# perplexities are exp of fp32 sums, whose order differs with the batch's shape: equal to this share
PPL_RTOL = 1e-5
# a choice's log-likelihood (a few tokens; fp32 sums in another order), within this
LL_ATOL = 1e-4
WEIGHTS_CPU = dict(percent="0/100/100/0/100/0", gpu_batch_size=2, num_gpu_batches=2, dtype="float32")
MODEL_NAMES = ("flexgen-lite", "flexgen_lite")  # lm_eval_model.py's register_model


def local_task_manager(include_path: str, **kwargs):
    """lm-eval's TaskManager over the local tasks only (not its built-in ones: nothing here uses them)."""
    kwargs.setdefault("include_defaults", False)
    return TaskManager(include_path=include_path, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def _offline(tmp_path_factory):
    """No network; datasets' cache in a folder of this module's (read when datasets is first imported)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
        yield


@pytest.fixture(scope="module")
def word_tasks(tmp_path_factory):
    """(folder, task manager) of the three tasks over the tiny models' words."""
    folder = write_tasks(tmp_path_factory.mktemp("word_tasks"), word_docs(), stop="w7", max_gen=8)
    return folder, local_task_manager(str(folder))


@pytest.fixture(scope="module")
def english_tasks(tmp_path_factory):
    folder = write_tasks(tmp_path_factory.mktemp("english_tasks"), ENGLISH, stop="\n", max_gen=8)
    return folder, local_task_manager(str(folder))


def evaluate(model, tasks, **kwargs) -> dict:
    """The three tasks' metrics from one lm-eval run, and two of its samples: local_gen's generated texts and
    local_mc's (log-likelihood, greedy) of each choice, by document (with these models the exact matches are 0 on
    both sides, and a bias small next to the gaps between choices leaves the accuracies as they are)."""
    out = lm_eval.simple_evaluate(model=model, tasks=TASK_NAMES, task_manager=tasks[1], log_samples=True,
                                  bootstrap_iters=0, **kwargs)
    scores = {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in out["results"].items()}
    scores["generated"] = {s["doc_id"]: s["filtered_resps"] for s in out["samples"]["local_gen"]}
    scores["raw"] = {s["doc_id"]: s["resps"][0] for s in out["samples"]["local_gen"]}
    scores["choices"] = {s["doc_id"]: [(float(lp), bool(greedy)) for lp, greedy in s["filtered_resps"]]
                         for s in out["samples"]["local_mc"]}
    scores["documents"] = {s["doc_id"]: (s["doc"]["text"], float(s["filtered_resps"][0]))
                           for s in out["samples"]["local_ppl"]}
    return scores


def assert_same_scores(ours: dict, theirs: dict) -> None:
    """Accuracies, exact matches, generated texts and greedy flags to the last digit; perplexities within
    PPL_RTOL; the choices' log-likelihoods within LL_ATOL."""
    assert ours.keys() == theirs.keys() == {*TASK_NAMES, "generated", "raw", "choices", "documents"}
    assert ours["generated"] == theirs["generated"] and ours["raw"] == theirs["raw"]
    assert any(text.strip() for texts in ours["generated"].values() for text in texts)  # not all empty
    assert ours["choices"].keys() == theirs["choices"].keys()
    for doc, choices in ours["choices"].items():
        assert [g for _, g in choices] == [g for _, g in theirs["choices"][doc]], doc
        assert [lp for lp, _ in choices] == pytest.approx([lp for lp, _ in theirs["choices"][doc]], abs=LL_ATOL), doc
    for task in TASK_NAMES:
        metrics = ours[task]
        assert metrics.keys() == theirs[task].keys()
        for key, value in metrics.items():
            if ("perplexity" in key or "bits_per_byte" in key) and isinstance(value, float):
                assert value == pytest.approx(theirs[task][key], rel=PPL_RTOL), (task, key)
            else:
                assert value == theirs[task][key], (task, key)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_tiny_models_score_as_hf(tiny_models, word_tasks, family):
    path = str(tiny_models[family][0])
    ours = evaluate(FlexGenLiteLM(path, progress=False, **WEIGHTS_CPU), word_tasks)
    theirs = evaluate("hf", word_tasks, model_args=f"pretrained={path},dtype=float32,device=cpu", batch_size=4)
    assert_same_scores(ours, theirs)
    assert 0 < ours["local_mc"]["acc,none"] < 1  # not degenerate: the choices' scores differ


def test_smollm_scores_as_hf(smollm, english_tasks):
    """A real model, its prompts through its chat template (lm-eval's --apply_chat_template)."""
    from lm_eval.models.huggingface import HFLM

    from flexgen_lite.models.gguf_tokenizer import gguf_tokenizer

    path, model = smollm
    ours = evaluate(FlexGenLiteLM(path, progress=False, percent="50/50/100/0/100/0", gpu_batch_size=4,
                                  dtype="float32"), english_tasks, apply_chat_template=True)
    theirs = evaluate(HFLM(pretrained=model, tokenizer=gguf_tokenizer(path), batch_size=4, device="cpu"),
                      english_tasks, apply_chat_template=True)
    assert_same_scores(ours, theirs)
    assert ours["local_mc"]["acc,none"] > 0


def test_an_explicit_policy_is_held_to_the_requests_lengths_not_generations(tiny_models):
    """A budget that holds the block for short scoring rows, not for 512 + 32-token generations: the model opens
    and scores (each block is checked at its real length)."""
    from flexgen_lite import Policy, Workload
    from flexgen_lite.generation import default_workload
    from flexgen_lite.model_source import model_config
    from flexgen_lite.planning.memory_plan import peak_memory

    path = str(tiny_models["opt"][0])
    config, policy = model_config(path), Policy(gpu_batch_size=64, dtype="float32")
    short = peak_memory(config, Workload(16, 1), policy, cuda=False)[1]["gpu"]
    long = peak_memory(config, default_workload(config), policy, cuda=False)[1]["gpu"]
    assert long > 2 * short
    lm = FlexGenLiteLM(path, progress=False, gpu_batch_size=64, dtype="float32", percent="100/0/100/0/100/0",
                       gpu_mem=str(int((short + long) / 2)))
    (logprob, greedy), = lm._loglikelihood_tokens([(("a", "b"), [2, 100, 200], [300, 400])], disable_tqdm=True)
    assert logprob < 0 and isinstance(greedy, bool)


def test_bad_model_args_end_in_one_error_line(tiny_models, capsys):
    with pytest.raises(SystemExit) as exit_:
        FlexGenLiteLM(str(tiny_models["opt"][0]), percent="0/100/100", progress=False)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_command_line(tiny_models, word_tasks, monkeypatch, capfd):
    """`python -m flexgen_lite.eval ...` (run here as __main__, as -m runs it, without a new interpreter's ~10 s):
    lm-eval's command line with "flexgen-lite" registered by the run itself, model_args parsed from the
    string. The module is unloaded and the names unregistered first, so that an entry point that forgot to
    register the model fails here."""
    import runpy
    import sys

    import lm_eval.tasks
    from lm_eval.api.registry import model_registry

    import flexgen_lite.eval

    # lm-eval's registry keeps its entries in `_objs` (0.4.x); without ours, only the run can register them
    monkeypatch.setattr(model_registry, "_objs", {k: v for k, v in model_registry._objs.items()
                                                  if k not in MODEL_NAMES})
    monkeypatch.delitem(sys.modules, "flexgen_lite.eval.lm_eval_model")
    monkeypatch.delattr(flexgen_lite.eval, "lm_eval_model", raising=False)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", local_task_manager)  # as word_tasks: the local tasks only
    assert not any(name in model_registry for name in MODEL_NAMES)

    folder, _ = word_tasks
    path = tiny_models["opt"][0]
    monkeypatch.setattr(sys, "argv", ["flexgen_lite.eval", "--model", "flexgen-lite", "--model_args",
                                      f"pretrained={path},percent=0/100/100/0/100/0,dtype=float32", "--tasks",
                                      "local_mc", "--include_path", str(folder)])
    try:
        runpy.run_module("flexgen_lite.eval", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        assert exit_.code in (None, 0), capfd.readouterr().err
    out = capfd.readouterr().out
    registered = model_registry.get("flexgen-lite")
    assert registered is not FlexGenLiteLM and registered.__module__ == "flexgen_lite.eval.lm_eval_model"
    assert "local_mc" in out and "flexgen-lite" in out


def test_max_length_cuts_as_hf_and_is_held_to_the_context(tiny_models, capsys):
    """max_length below the context cuts a request's tokens from the left as hf's model does (its log-likelihood
    equal to hf's); above the model's context it is the context, said once (windows past it would lose targets)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    path = str(tiny_models["llama"][0])
    context = " ".join(f"w{5 + i}" for i in range(40))
    request = [Instance("loglikelihood", {}, (context, " w5 w6"), 0)]
    ours = FlexGenLiteLM(path, progress=False, max_length=16, **WEIGHTS_CPU).loglikelihood(request)
    theirs = HFLM(pretrained=path, dtype="float32", device="cpu", max_length=16, batch_size=1).loglikelihood(request)
    assert ours[0][0] == pytest.approx(theirs[0][0], abs=LL_ATOL)
    uncut = FlexGenLiteLM(path, progress=False, **WEIGHTS_CPU).loglikelihood(request)
    assert abs(uncut[0][0] - ours[0][0]) > 1e-3  # the cut changed it

    document = [Instance("loglikelihood_rolling", {}, (" ".join(f"w{5 + i % 300}" for i in range(200)),), 0)]
    capsys.readouterr()
    long = FlexGenLiteLM(path, progress=False, max_length=128, **WEIGHTS_CPU)
    assert long.max_length == 64 and "exceeds" in capsys.readouterr().err
    default = FlexGenLiteLM(path, progress=False, **WEIGHTS_CPU)
    assert long.loglikelihood_rolling(document) == default.loglikelihood_rolling(document)


def test_local_completions_against_the_server_scores_as_hf(tiny_models, word_tasks, tmp_path, monkeypatch):
    """lm-eval's own OpenAI client (`local-completions`) against `flexgen-lite serve`: the prompts' tokens scored
    through echo + logprobs, the tokenizer read from the server (/tokenizer_info, /tokenize), generations through
    the queue: the same scores as lm-eval's hf model, and each document's log-likelihood as transformers' over the
    API's windows (a token shorter than hf's: each request also generates one)."""
    pytest.importorskip("tenacity")  # lm-eval[api]
    from .test_serve import KEY, NAME, Server

    path = str(tiny_models["opt"][0])
    context = 64  # the tiny models'
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = Server(path, tmp_path / "state", "--gpu-batch-size", "4", "--max-wait-ms", "20")
    try:
        ours = evaluate("local-completions", word_tasks, model_args=f"base_url={server.url}/v1/completions,"
                        f"model={NAME},max_length={context},batch_size=4")
    finally:
        server.stop()
    theirs = evaluate("hf", word_tasks, model_args=f"pretrained={path},dtype=float32,device=cpu", batch_size=4)
    ppl = "local_ppl"
    # the server's texts continue the prompt's (the word-level tokenizer's space before the first word), hf's decode
    # the continuation alone: the same texts but for that space
    stripped = [{doc: [text.lstrip() for text in texts] for doc, texts in side["raw"].items()}
                for side in (ours, theirs)]
    assert stripped[0] == stripped[1]
    assert any(text.startswith(" ") for texts in ours["raw"].values() for text in texts)
    assert not any(text.startswith(" ") for texts in theirs["raw"].values() for text in texts)
    assert_same_scores({**ours, ppl: theirs[ppl], "documents": {}, "raw": {}}, {**theirs, "documents": {}, "raw": {}})
    assert 0 < ours["local_mc"]["acc,none"] < 1
    # the documents in the API's windows (api_models.py: predicting up to context - 2 tokens after one)
    model, tokenizer = tiny_models["opt"][1], AutoTokenizer.from_pretrained(path)
    for text, logprob in ours["documents"].values():
        expected = 0.0
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        for window in get_rolling_token_windows(tokens, tokenizer.eos_token_id, context - 2, 1):
            before, continuation = make_disjoint_window(window)
            ids = before + continuation
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            targets = torch.tensor(ids[len(ids) - len(continuation):])
            expected += torch.log_softmax(logits[len(ids) - len(continuation) - 1:-1], -1).gather(
                1, targets[:, None]).sum().item()
        assert logprob == pytest.approx(expected, abs=LL_ATOL * len(tokens)), text[:40]
    assert max(len(text.split()) for text, _ in ours["documents"].values()) > context  # windowed


def test_a_template_that_refuses_a_system_message_is_applied_without_it():
    """helper-43: with --system_instruction, a chat template that refuses a system message (Gemma's) failed the
    whole run; lm-eval's hf model applies it again without the system messages. Both, on the same tokenizer."""
    from types import SimpleNamespace

    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<bot>"
                               "{% endif %}")
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    theirs = HFLM.apply_chat_template(SimpleNamespace(tokenizer=tokenizer, chat_template_args={}), history)
    ours = FlexGenLiteLM.apply_chat_template(SimpleNamespace(tokenizer=tokenizer), history)
    assert ours == theirs == "<user>hi<bot>"
