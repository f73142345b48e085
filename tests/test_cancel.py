"""Requests no longer wanted stop at the engine's next step: a prompt cancelled before its block is not run, one
cancelled mid-block stops there, and the others' outputs are what they are without it; through the server's
queue, a streaming client that leaves and a cancelled batch stop their rows (the queue then serves the next)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import pytest

from flexgen_lite.engine.policy import Policy
from flexgen_lite.generation import FlexGenLite
from flexgen_lite.kernels.sampling import SamplingConfig
from flexgen_lite.openai_api.requests import Job
from flexgen_lite.serve.scheduler import Scheduler

from .test_serve import KEY, NAME, Server, batch_file, raw, request, wait_for_batch

PROMPTS = ["w5 w6 w7", "w9", "w30 w31", "w40 w41 w42 w43", "w50"]
NEW = 8


@pytest.fixture(scope="module")
def model(tiny_models):
    with FlexGenLite(str(tiny_models["opt"][0]), policy=Policy(gpu_batch_size=2, dtype="float32")) as m:
        yield m


@pytest.fixture(scope="module")
def prompts(model):
    return [model.tokenizer(p)["input_ids"] for p in PROMPTS]


def test_cancelled_prompts_stop_and_the_others_are_unchanged(model, prompts):
    sampling = SamplingConfig(NEW, stop_at_eos=False)
    reference = model.generate_ids(prompts, sampling)
    seen: dict[int, int] = {}  # tokens each prompt had at the last step reported
    blocks, reported = [], []
    run = model.engine.run
    model.engine.run = lambda block, *a, **k: blocks.append(block) or run(block, *a, **k)
    try:
        got = model.generate_ids(prompts, sampling, on_tokens=lambda i, ids: seen.__setitem__(i, len(ids)),
                                 on_block=lambda done: reported.extend(done),
                                 cancelled=lambda i: i in (1, 4) or (i == 3 and seen.get(3, 0) >= 2))
    finally:
        del model.engine.run
    assert 3 in seen and 1 not in seen and 4 not in seen  # 1, 4: never run (4 had a block of its own)
    assert got[3] == reference[3][:3]  # the step after its second token's report: cancelled, stopped there
    assert sorted(reported) == [0, 2]
    assert [got[i] for i in (0, 2)] == [reference[i] for i in (0, 2)]
    assert len(blocks) == 2  # of three: the one holding 4 alone was skipped


def test_the_queue_stops_a_request_that_left_and_serves_the_rest(model, prompts):
    sampling = SamplingConfig(NEW, stop_at_eos=False)
    reference = model.generate_ids(prompts, sampling)
    scheduler = Scheduler(model, model.policy.block_size, max_wait_s=0.2)
    try:
        steps = []
        left = scheduler.submit([Job(tuple(prompts[3]), sampling, 0)], lambda k, ids: steps.append(len(ids)),
                                cancelled=lambda: len(steps) >= 3)
        stays = scheduler.submit([Job(tuple(p), sampling, i) for i, p in enumerate(prompts[:3])],
                                 cancelled=lambda: False)
        assert left.result(timeout=120) == [None] and max(steps) < NEW
        assert [o.token_ids for o in stays.result(timeout=120)] == reference[:3]
        assert scheduler.cancelled == 1
        runs = scheduler.runs
        gone = scheduler.submit([Job(tuple(prompts[0]), sampling, 0)], cancelled=lambda: True)
        assert gone.result(timeout=120) == [None] and scheduler.runs == runs  # left while it waited: never run
        assert scheduler.cancelled == 2
    finally:
        scheduler.close()


def test_a_background_run_yields_to_a_request_between_blocks(model, prompts):
    """A background request (the Batch API's) of three blocks, and an interactive one arriving during its first
    block: that one runs next, then the rest of the background request, whose outputs are those of an
    uninterrupted run."""
    sampling = SamplingConfig(NEW, stop_at_eos=False)
    reference = model.generate_ids(prompts, sampling)
    scheduler = Scheduler(model, model.policy.block_size, max_wait_s=0.01)
    order, arrived = [], []
    try:
        def first_step(k: int, ids: list[int]) -> None:  # the engine thread, in the background run's first block
            if not arrived:
                arrived.append(scheduler.submit([Job(tuple(prompts[1]), sampling, 0)]))
                arrived[0].add_done_callback(lambda f: order.append("interactive"))

        background = scheduler.submit([Job(tuple(p), sampling, i) for i, p in enumerate(prompts)], first_step,
                                      background=True)
        background.add_done_callback(lambda f: order.append("background"))
        outputs = background.result(timeout=120)
        assert [o.token_ids for o in arrived[0].result(timeout=120)] == [reference[1]]
        assert [o.token_ids for o in outputs] == reference
        assert order == ["interactive", "background"] and scheduler.runs == 3
        assert scheduler.sequences == len(prompts) + 1 and scheduler.cancelled == 0
    finally:
        scheduler.close()


def test_background_scoring_yields_too_and_a_closing_queue_defers_it(model, prompts):
    """Echoed prompts scored in the background (max_tokens 0) yield between blocks of them as generation does;
    and when the queue closes, what has not started is left (the Batch API runs it at the next start)."""
    sampling = SamplingConfig(NEW, stop_at_eos=False)
    scored = [Job(tuple(p), sampling, i, 1, 1, False) for i, p in enumerate(prompts)]
    reference = model.prompt_logprobs([list(p) for p in prompts], 1)
    scheduler = Scheduler(model, model.policy.block_size, max_wait_s=0.01)
    order, arrived = [], []
    real = model.prompt_logprobs

    def scoring(rows, top):  # the engine thread, at each block of scored prompts
        if not arrived:
            arrived.append(scheduler.submit([Job(tuple(prompts[1]), sampling, 0)]))
            arrived[0].add_done_callback(lambda f: order.append("interactive"))
        return real(rows, top)

    model.prompt_logprobs = scoring
    try:
        background = scheduler.submit(scored, background=True)
        background.add_done_callback(lambda f: order.append("background"))
        outputs = background.result(timeout=120)
        assert order == ["interactive", "background"] and scheduler.runs == 3
        for o, r in zip(outputs, reference, strict=True):  # fp32: as scored alone, but for the sums' order
            assert o.prompt_logprobs[0][1] is None
            assert [lp for _, lp, _ in o.prompt_logprobs[1:]] == pytest.approx([p[0] for p in r[1:]], abs=1e-5)
    finally:
        del model.prompt_logprobs
        scheduler.close()
    scheduler = Scheduler(model, model.policy.block_size, max_wait_s=0.01)
    closing = []
    model.prompt_logprobs = lambda rows, top: closing.append(threading.Thread(target=scheduler.close).start()) \
        or real(rows, top) if not closing else real(rows, top)
    try:
        left = scheduler.submit(scored, background=True)
        with pytest.raises(CancelledError):
            left.result(timeout=120)
        assert scheduler.sequences < len(scored)  # the first block's, not the rest
    finally:
        del model.prompt_logprobs
        scheduler.close()


@pytest.fixture(scope="module")
def tiny_long(tiny_models, tmp_path_factory) -> str:
    """The tiny Llama with a long context (its rotary positions need no weights): generations of thousands of
    tokens, so that a client leaves long before one ends."""
    path = tmp_path_factory.mktemp("cancel") / "tiny-long"
    shutil.copytree(tiny_models["llama"][0], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return str(path)


@pytest.fixture(scope="module")
def long_server(tiny_long, tmp_path_factory):
    s = Server(tiny_long, tmp_path_factory.mktemp("state") / "state", "--gpu-batch-size", "4", "--max-wait-ms", "20")
    yield s
    s.stop()


def health(server) -> dict:
    return json.loads(raw(f"{server.url}/health", key=None)[1])


def until(condition, what: str, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return found


def test_a_streaming_client_that_leaves_stops_its_generation(long_server):
    c = long_server.client
    before = health(long_server)["cancelled"]
    stream = c.completions.create(model=NAME, prompt="w5 w6", max_tokens=4000, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    until(lambda: health(long_server)["cancelled"] == before + 1, "the stream's generation went on")
    until(lambda: '"POST /v1/completions" 499' in long_server.log.read_text(), "the stream left unlogged")
    answer = c.completions.create(model=NAME, prompt="w9", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 3


def test_a_non_streaming_client_that_leaves_stops_its_generation(long_server):
    before = health(long_server)["cancelled"]
    body = json.dumps({"model": NAME, "prompt": "w5", "max_tokens": 4000, "ignore_eos": True}).encode()
    with ThreadPoolExecutor(1) as pool:
        timed_out = pool.submit(lambda: _post_with_timeout(f"{long_server.url}/v1/completions", body, 1.0))
        assert timed_out.result() == "timed out"
    until(lambda: health(long_server)["cancelled"] == before + 1, "the request's generation went on")


def _post_with_timeout(url: str, body: bytes, seconds: float) -> str:
    import urllib.request

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    try:
        urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=seconds).read()
    except TimeoutError:
        return "timed out"
    except OSError as e:
        return "timed out" if "timed out" in str(e) else str(e)
    return "answered"


def test_a_cancelled_batch_stops_mid_run(long_server):
    """Fewer requests than one run of the batch worker: the cancel stops them where they are (it was seen only
    between runs before)."""
    c = long_server.client
    lines = [request(f"r{i}", "w5 w6", max_tokens=4000, ignore_eos=True) for i in range(3)]
    file = c.files.create(file=("long.jsonl", batch_file(lines)), purpose="batch")
    runs = health(long_server)["engine_runs"]
    batch = c.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    until(lambda: health(long_server)["engine_runs"] > runs, "the batch did not start")
    c.batches.cancel(batch.id)
    batch = wait_for_batch(c, batch.id)
    assert batch.status == "cancelled" and batch.request_counts.completed == 0, batch
    assert batch.output_file_id is None


def test_a_batch_whose_window_passes_in_its_last_run_expires(tiny_long, tmp_path):
    """One run holds the whole batch: the window passing mid-run stops it, and the batch ends expired (it ended
    completed, every request failed), each request in the error file once."""
    s = Server(tiny_long, tmp_path / "state", "--gpu-batch-size", "4", "--batch-expiry-s", "2")
    try:
        lines = [request(f"r{i}", "w5 w6", max_tokens=4000, ignore_eos=True) for i in range(3)]
        file = s.client.files.create(file=("long.jsonl", batch_file(lines)), purpose="batch")
        batch = s.client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
        batch = wait_for_batch(s.client, batch.id)
        assert batch.status == "expired" and batch.expired_at, batch
        counts = batch.request_counts
        assert (counts.total, counts.completed, counts.failed) == (3, 0, 3)
        errors = [json.loads(line) for line in s.client.files.content(batch.error_file_id).text.splitlines()]
        assert sorted(e["custom_id"] for e in errors) == ["r0", "r1", "r2"]
        assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    finally:
        s.stop()


def test_a_cancel_that_lands_while_a_batch_ends_wins(tmp_path):
    """The worker read the batch in progress and finishes it as expired (or completed) while the cancel route
    moves it to cancelling: it ends cancelled (it stayed cancelling: neither move is allowed from there)."""
    from flexgen_lite.serve.batches import BatchRunner
    from flexgen_lite.serve.store import Store

    store = Store(str(tmp_path / "state"))
    runner = BatchRunner(store, None, None, 1)  # an empty store: nothing for its thread to resume
    try:
        file = store.add_file("in.jsonl", "batch", b"{}\n")
        batch = store.create_batch(file.id, "/v1/completions", "24h", None)
        store.move(batch.id, "in_progress", total=1)
        store.move(batch.id, "cancelling")
        runner._finish(batch.id, expired=True)
        assert store.get_batch(batch.id).status == "cancelled"
    finally:
        runner.stop()
        runner.join()
        store.close()


def test_a_batch_whose_output_cannot_be_written_tries_again(tmp_path, monkeypatch):
    """helper-37: a full disk while a batch's output file was written left it "finalizing" for good (its move to
    failed is not allowed from there) until a restart. Its results are stored: it tries again later, and completes
    once the disk has room; a half-written file is not left behind."""
    import errno

    from flexgen_lite.serve import batches
    from flexgen_lite.serve.batches import BatchRunner
    from flexgen_lite.serve.store import Store

    monkeypatch.setattr(batches, "RETRY_S", 0.05)
    store = Store(str(tmp_path / "state"))
    file = store.add_file("in.jsonl", "batch", b"{}\n")
    batch = store.create_batch(file.id, "/v1/completions", "24h", None)
    store.move(batch.id, "in_progress", total=1)
    store.add_results(batch.id, [(0, True, {"custom_id": "r0"})])
    store.move(batch.id, "finalizing")
    add_file, full = store.add_file, [2]

    def disk_full(*args, **kwargs):
        if full[0]:
            full[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return add_file(*args, **kwargs)

    monkeypatch.setattr(store, "add_file", disk_full)
    runner = BatchRunner(store, None, None, 1)  # resumes the finalizing batch
    try:
        deadline = time.monotonic() + 20
        while store.get_batch(batch.id).status != "completed" and time.monotonic() < deadline:
            time.sleep(0.05)
        done = store.get_batch(batch.id)
        assert done.status == "completed" and full[0] == 0
        assert store.file_path(done.output_file_id).read_text() == '{"custom_id": "r0"}\n'
    finally:
        runner.stop()
        runner.join()
        store.close()


def test_a_state_directory_serves_one_server(tmp_path):
    """helper-37: a second server on the same --state-dir queued the first one's unfinished batches too, and both
    failed them (UNIQUE constraint failed: results.batch_id, results.line). The directory is locked while a store
    holds it; a half-written upload of a killed server is removed at the next start."""
    from flexgen_lite.serve.store import StateDirBusy, Store

    store = Store(str(tmp_path / "state"))
    try:
        (store.files_dir / "file-x.tmp").write_bytes(b"partial")
        with pytest.raises(StateDirBusy):
            Store(str(tmp_path / "state"))
    finally:
        store.close()
    again = Store(str(tmp_path / "state"))
    assert not list(again.files_dir.glob("*.tmp"))
    again.close()
