"""The lm-eval model (flexgen_lite/eval): on local tasks, the same scores as `lm-eval --model hf` on the same
model and data, to the last digit (fp32)."""

from __future__ import annotations

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval[hf]: its hf model, the reference

from flexgen_lite.eval.lm_eval_model import FlexGenLiteLM  # noqa: E402

from .lm_eval_tasks import ENGLISH, word_docs, write_tasks  # noqa: E402

TASK_NAMES = ["local_mc", "local_gen", "local_ppl"]
# perplexities are exp of fp32 sums, whose order differs with the batch's shape: equal to this share
PPL_RTOL = 1e-5
WEIGHTS_CPU = dict(percent="0/100/100/0/100/0", gpu_batch_size=2, num_gpu_batches=2, dtype="float32")


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def evaluate(model, folder, **kwargs) -> dict:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, tasks=TASK_NAMES, task_manager=TaskManager(include_path=str(folder)),
                                  log_samples=False, bootstrap_iters=0, **kwargs)
    return {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in out["results"].items()}


def assert_same_scores(ours: dict, theirs: dict) -> None:
    """Accuracies and exact matches to the last digit; perplexities within PPL_RTOL."""
    assert ours.keys() == theirs.keys()
    for task, metrics in ours.items():
        assert metrics.keys() == theirs[task].keys()
        for key, value in metrics.items():
            if ("perplexity" in key or "bits_per_byte" in key) and isinstance(value, float):
                assert value == pytest.approx(theirs[task][key], rel=PPL_RTOL), (task, key)
            else:
                assert value == theirs[task][key], (task, key)


def test_tiny_models_score_as_hf(tiny_models, tmp_path):
    folder = write_tasks(tmp_path / "tasks", word_docs(), stop="w7", max_gen=8)
    for family in ("opt", "llama"):
        path = str(tiny_models[family][0])
        ours = evaluate(FlexGenLiteLM(path, progress=False, **WEIGHTS_CPU), folder)
        theirs = evaluate("hf", folder, model_args=f"pretrained={path},dtype=float32,device=cpu", batch_size=4)
        assert_same_scores(ours, theirs)
        assert 0 < ours["local_mc"]["acc,none"] < 1  # not degenerate: the choices' scores differ


def test_smollm_scores_as_hf(smollm, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from flexgen_lite.models.gguf_file import gguf_tokenizer

    path, model = smollm
    folder = write_tasks(tmp_path / "tasks", ENGLISH, stop="\n", max_gen=8)
    ours = evaluate(FlexGenLiteLM(path, progress=False, percent="50/50/100/0/100/0", gpu_batch_size=4,
                                  dtype="float32"), folder)
    theirs = evaluate(HFLM(pretrained=model, tokenizer=gguf_tokenizer(path), batch_size=4, device="cpu"), folder)
    assert_same_scores(ours, theirs)
    assert ours["local_mc"]["acc,none"] > 0


def test_bad_model_args_end_in_one_error_line(tiny_models, capsys):
    with pytest.raises(SystemExit) as exit_:
        FlexGenLiteLM(str(tiny_models["opt"][0]), percent="0/100/100", progress=False)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_command_line(tiny_models, tmp_path):
    import subprocess
    import sys

    folder = write_tasks(tmp_path / "tasks", word_docs(), stop="w7", max_gen=8)
    path = tiny_models["opt"][0]
    out = subprocess.run([sys.executable, "-m", "flexgen_lite.eval", "--model", "flexgen-lite", "--model_args",
                          f"pretrained={path},percent=0/100/100/0/100/0,dtype=float32", "--tasks", "local_mc",
                          "--include_path", str(folder)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "local_mc" in out.stdout
