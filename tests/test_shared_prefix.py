"""A block's common prompt prefix computed once in the prefill (Block.shared_columns, Engine._prefix_through):
transformers' greedy output and logits under the placements whose prefill writes the cache differently, and the
same tokens as the same run with the prefix computed per row."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, PolicyError, SamplingConfig
from flexgen_lite.cli.main import main
from flexgen_lite.engine.block import MIN_SHARED, Block, block_order, shared_columns
from flexgen_lite.models.presets import preset_config
from flexgen_lite.planning.cost_model import predict
from flexgen_lite.planning.layout import Workload

from .conftest import hf_greedy, on_device, synthetic_profile
from .test_parity import LOGITS_ATOL, POLICIES

PREFIX = torch.randint(3, 400, (30,), generator=torch.Generator().manual_seed(5)).tolist()
# an instruction, then items of different lengths (sorted into blocks by length: every block has two or more)
SHARED_PROMPTS = [[2, *PREFIX, *range(100 + 10 * i, 100 + 10 * i + n)] for i, n in enumerate((3, 1, 7, 5, 2, 9, 4, 6))]
PLACEMENTS = ["all-gpu", "weights-disk", "cache-cpu", "cache-split-3-tiers", "act-disk-split", "one-row-batches",
              "block-larger-than-prompts", "cpu-attention-cache-split"]


@pytest.fixture(scope="module")
def shared_references(tiny_models, compute_device):
    return {family: hf_greedy(on_device(tiny_models[family][1], compute_device), SHARED_PROMPTS, 6)
            for family in ("opt", "llama3", "qwen3")}


def run(model_dir, policy: Policy, device: str, prompts=SHARED_PROMPTS, new_tokens: int = 6):
    """(ids, logits, each block's shared columns)."""
    shared = []
    with FlexGenLite(str(model_dir), policy=policy, device=device) as m:
        ids, logits = m.generate_ids(prompts, SamplingConfig(max_new_tokens=new_tokens, stop_at_eos=False),
                                     return_logits=True, on_block=lambda _: shared.append(m.engine.times.shared))
    return ids, logits, shared


@pytest.mark.parametrize("family", ["opt", "llama3", "qwen3"])
@pytest.mark.parametrize("name", PLACEMENTS)
def test_shared_prefix_matches_transformers(tiny_models, shared_references, compute_device, family, name):
    ids, logits, shared = run(tiny_models[family][0], POLICIES[name], compute_device)
    assert shared and all(n > MIN_SHARED for n in shared), shared  # every block shared the instruction
    want_ids, want_logits = shared_references[family]
    assert ids == want_ids
    for ours, theirs in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("switches", [dict(compress_cache=True), dict(compress_weight=True),
                                      dict(compress_cache=True, cpu_cache_compute=True, cache_gpu_percent=0,
                                           cache_cpu_percent=100)])
def test_shared_prefix_under_compression_same_as_per_row(tiny_models, compute_device, switches):
    """4-bit weights or cache are lossy: there the reference is the same run computing the prefix per row."""
    policy = dataclasses.replace(POLICIES["all-gpu"], **switches)
    ids, logits, shared = run(tiny_models["llama"][0], policy, compute_device)
    want_ids, want_logits, none = run(tiny_models["llama"][0], dataclasses.replace(policy, share_prefix=False),
                                      compute_device)
    assert all(shared) and not any(none)
    assert ids == want_ids
    for ours, theirs in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_same_prompts_leave_one_token_per_row(tiny_models, compute_device):
    """Identical prompts: all but the last token are shared; each row's prefill is then one position."""
    prompts = [SHARED_PROMPTS[0]] * 4
    ids, _, shared = run(tiny_models["llama3"][0], POLICIES["all-gpu"], compute_device, prompts)
    assert shared == [len(prompts[0]) - 1]
    want, _, _ = run(tiny_models["llama3"][0], dataclasses.replace(POLICIES["all-gpu"], share_prefix=False),
                     compute_device, prompts)
    assert ids == want and len({tuple(i) for i in ids}) == 1


def test_shared_columns():
    prefix = list(range(3, 3 + 20))
    prompts = [prefix + [50, 51], prefix + [60], prefix + [70, 71, 72]]
    assert shared_columns(prompts) == 20
    far = [prefix + [50], prefix + [60] + list(range(200, 400))]  # 20 shared positions of 2 x 221: too few
    assert shared_columns(far) == 0
    assert shared_columns([prefix + [50]]) == 0  # one prompt: nothing to share
    assert shared_columns([prefix, prefix]) == 19  # the shortest keeps its last token
    short = prefix[:MIN_SHARED - 1]
    assert shared_columns([short + [1, 2], short + [3]]) == 0  # too short to be worth a pass
    differs = [prefix + [50], [4] + prefix[1:] + [60]]
    assert shared_columns(differs) == 0


def test_block_positions_of_a_shared_prefix():
    """Step 0 computes each row from column `shared`; row i's columns [pad_i, shared) hold prefix tokens."""
    prefix = list(range(3, 3 + 20))
    prompts = [prefix + [50, 51, 52], prefix + [60]]
    block = Block.from_prompts(prompts, 2, 2, 4, 1, (), torch.device("cpu"), share_prefix=True)
    assert block.shared == 20 and block.prefix.tolist() == [prefix]
    assert block.step_span(0) == (20, 3) and block.step_span(1) == (23, 1)
    pad = block.pad.tolist()
    for row, p in enumerate(prompts):
        assert block.tokens[row, pad[row]:20].tolist() == prefix[:20 - pad[row]]
        assert block.tokens[row, 20:23].tolist() == p[20 - pad[row]:]
    unshared = Block.from_prompts(prompts, 2, 2, 4, 1, (), torch.device("cpu"))
    assert unshared.shared == 0 and unshared.step_span(0) == (0, 23)


def test_workload_of_prompts_and_its_prediction():
    """The cost model computes a shared prefix once per block, as the engine does, where the policy shares it."""
    workload = Workload.of_prompts(SHARED_PROMPTS, 32)
    assert (workload.prompt_len, workload.num_prompts, workload.shared_len) == (40, 8, 31)
    assert Workload.of_prompts([SHARED_PROMPTS[0]], 32).shared_len == 0
    config, hw = preset_config("facebook/opt-1.3b"), synthetic_profile()
    policy = Policy(gpu_batch_size=32, dtype="bfloat16")
    whole = predict(config, Workload(512, 32), policy, hw)
    shared = predict(config, Workload(512, 32, shared_len=448), policy, hw)
    unshared = predict(config, Workload(512, 32, shared_len=448), dataclasses.replace(policy, share_prefix=False), hw)
    assert unshared.prefill_s == whole.prefill_s
    # 32 rows x 64 positions, and one row of 448: about a sixth of 32 x 512 (attention to the whole prompt kept)
    assert 0.1 * whole.prefill_s < shared.prefill_s < 0.3 * whole.prefill_s
    assert shared.decode_step_s == whole.decode_step_s
    few = predict(config, Workload(512, 32, shared_len=MIN_SHARED - 1), policy, hw)
    assert few.prefill_s == whole.prefill_s  # the engine does not share so few
    with pytest.raises(PolicyError, match="shorter than the prompts"):
        Workload(16, 4, shared_len=16)


def test_bench_and_plan_take_a_shared_prefix(tiny_models, capsys, tmp_path, monkeypatch):
    model = str(tiny_models["llama"][0])
    flags = ["--percent", "100", "0", "100", "0", "100", "0", "--gpu-batch-size", "4", "--prompt-len", "40",
             "--gen-len", "3", "--dtype", "float32", "--device", "cpu"]
    reports = {}
    for share in ("--share-prefix", "--no-share-prefix"):
        main(["bench", "--model", model, *flags, "--shared-prefix", "30", share])
        reports[share] = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert reports["--share-prefix"]["prefill_shared"] == 30 and reports["--no-share-prefix"]["prefill_shared"] == 0
    assert "--no-share-prefix" in reports["--no-share-prefix"]["policy"]
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", model, *flags, "--shared-prefix", "40"])
    assert e.value.code == 2 and "--shared-prefix 40 must be below the prompt length (40)" in capsys.readouterr().err
    (tmp_path / "profile.json").write_text(synthetic_profile().to_json())
    monkeypatch.setenv("FLEXGEN_LITE_PROFILE", str(tmp_path / "profile.json"))
    main(["plan", "--model", "facebook/opt-1.3b", "--prompt-len", "512", "--shared-prefix", "400", "--cpu-mem", "8GiB"])
    assert "the first 400 tokens shared" in capsys.readouterr().out


def test_a_job_of_two_instructions_shares_one_in_every_block(tiny_models, compute_device):
    """Prompts of two instructions, interleaved in the input: gathered by instruction, each block shares one (by
    length alone the blocks would mix them); outputs as each prompt computed whole, in input order."""
    other = [2, *torch.randint(3, 400, (24,), generator=torch.Generator().manual_seed(9)).tolist()]
    prompts = [p for pair in zip(SHARED_PROMPTS, [other + p[31:] for p in SHARED_PROMPTS], strict=True) for p in pair]
    ids, _, shared = run(tiny_models["llama3"][0], POLICIES["all-gpu"], compute_device, prompts)
    assert len(shared) == 4 and all(shared), shared
    whole, _, _ = run(tiny_models["llama3"][0], dataclasses.replace(POLICIES["all-gpu"], share_prefix=False),
                      compute_device, prompts)
    assert ids == whole


def test_block_order():
    a, b = list(range(3, 3 + MIN_SHARED)), list(range(100, 100 + MIN_SHARED))
    prompts = [a + [1], b + [1, 2, 3], a + [1, 2], [5, 6], b + [4], [7] * 30]
    assert block_order(prompts, by_prefix=False) == [5, 1, 2, 0, 4, 3]  # longest first
    # groups by their longest (b: 19 tokens, a: 18), each longest first; the others by their own length
    assert block_order(prompts, by_prefix=True) == [5, 1, 4, 2, 0, 3]


@pytest.mark.parametrize("name", ["cache-cpu", "cpu-attention-cache-split", "weights-disk"])
def test_shared_prefix_across_a_link(tiny_models, shared_references, name):
    """The GPU's data paths (cpu+link): the prefix's k, v spread into cache parts that cross the link or are
    attended on the CPU beside it, as on a CPU."""
    ids, logits, shared = run(tiny_models["llama3"][0], POLICIES[name], "cpu+link")
    assert all(shared)
    want_ids, want_logits = shared_references["llama3"]
    assert ids == want_ids
    for ours, theirs in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_progress_says_what_the_prefill_shared(tiny_models):
    seen: list[str] = []
    with FlexGenLite(str(tiny_models["llama"][0]), policy=POLICIES["all-gpu"], progress=seen.append) as m:
        m.generate_ids(SHARED_PROMPTS[:4], SamplingConfig(max_new_tokens=2, stop_at_eos=False))
    assert any(s.startswith("block 1/1: prefill of 4 prompts (their first 31 tokens once)") for s in seen), seen


@pytest.mark.parametrize("name", ["all-gpu", "weights-disk", "cache-disk", "cpu-attention-cache-split"])
def test_few_shot_scoring_shares_the_examples(tiny_models, name):
    """Multiple-choice and single requests after the same 30-token few-shot examples: the log-likelihoods equal
    transformers' (test_scoring's tolerance), the examples computed once per block; rows scored from before the
    end of the common prefix (a long continuation) share nothing."""
    from .test_scoring import check, hf_score

    path, model = tiny_models["llama3"]
    rng = torch.Generator().manual_seed(3)
    reqs = []
    for n in range(8):
        context = [2, *PREFIX, *torch.randint(3, 400, (3 + n % 5,), generator=rng).tolist()]
        reqs += [(context, torch.randint(3, 400, (1 + c,), generator=rng).tolist()) for c in range(1 + 3 * (n % 2))]
    with FlexGenLite(str(path), policy=POLICIES[name]) as m:
        ours = m.score(reqs)
        assert all(n >= MIN_SHARED for n in m.score_stats.shared), m.score_stats.shared
        early = [([2, *PREFIX[:3]], [*PREFIX[3:], 7, 8]), ([2, *PREFIX, 11, 12], [13])]  # scored from column 4
        ours_early = m.score(early)
        assert m.score_stats.shared == [0]
    check(ours, hf_score(model, reqs), reqs)
    check(ours_early, hf_score(model, early), early)


def test_generate_takes_an_instruction_once(tiny_models, tmp_path, capsys):
    """--instruction (text or @FILE) goes before every prompt: the same completions as prompts that hold it, the
    prefill sharing it; it is recorded, so a resume without it is refused; --system needs --chat."""
    model = str(tiny_models["llama3"][0])
    words = " ".join(f"w{i}" for i in range(100, 112))
    (tmp_path / "instruction.txt").write_text(words + "\n")
    flags = ["--model", model, "--dtype", "float32", "--policy", "manual", "--gpu-batch-size", "4", "--json",
             "--max-new-tokens", "3"]
    items = ["w5 w6", "w7", "w8 w9 w10"]
    main(["generate", *flags, "--instruction", f"@{tmp_path / 'instruction.txt'}", *items])
    given = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    main(["generate", *flags, *[f"{words}\n\n{item}" for item in items]])
    inline = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    assert given == inline and len(given) == 3
    out = tmp_path / "out.jsonl"
    main(["generate", *flags, "--instruction", words, "--output", str(out), items[0]])
    assert json.loads(out.read_text().splitlines()[0])["flexgen_lite_run"]["settings"]["instruction"] == words
    with pytest.raises(SystemExit) as e:
        main(["generate", *flags, "--output", str(out), items[0], items[1]])
    assert e.value.code == 2 and "--instruction" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", *flags, "--system", "be brief", items[0]])
    assert e.value.code == 2 and "--system is the chat template's system message: add --chat" in \
        capsys.readouterr().err


def test_a_shared_prefill_keeps_peak_rss_under_the_cpu_budget(tmp_path):
    """The memory plan counts a prefill of whole prompts; a shared one (rows' own positions, the prefix's k, v
    spread into each row) stays under it: `bench --cpu-mem` in a process of its own, peak RSS within the budget."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "flexgen_lite.cli", "bench", "--model", "facebook/opt-125m", "--dtype",
                          "bfloat16", "--percent", "100", "0", "100", "0", "100", "0", "--gpu-batch-size", "32",
                          "--prompt-len", "256", "--gen-len", "4", "--shared-prefix", "224", "--cpu-mem", "1150MiB",
                          "--no-warmup", "--offload-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["prefill_shared"] == 224 and report["peak_rss_gb"] * 1e9 <= 1150 * 2**20
