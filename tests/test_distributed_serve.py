"""`mlx-gptoss serve` across ranks (issue 16): rank 0 serves HTTP on 127.0.0.1, rank 1 follows.

Two real processes joined by MLX's ring backend (MLX_RANK/MLX_HOSTFILE, as `mlx.launch` sets
them); their answers are compared with the same requests to a one-process server on the same
checkpoint. Every wait is on a line a process writes, a response, or a process exit; the
timeouts are safety nets only.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from mlx_gptoss.distributed import local_hostfile
from mlx_gptoss.sampling import SamplingParams
from mlx_gptoss.server import create_app
from mlx_gptoss.server.app import running
from mlx_gptoss.server.worker import job_message, job_options

from test_distributed import CLI, CLI_ENV, SAFETY_TIMEOUT, make_chat4, rank_env

NAME = "gpt-oss-test"
CHAT = dict(model=NAME, messages=[{"role": "user", "content": "Hello there"}], temperature=0,
            max_tokens=12)
RESPONSE = dict(model=NAME, input="Say something.", temperature=0, max_output_tokens=10)
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
CONSTRAINED = dict(RESPONSE, max_output_tokens=48, text={"format": {
    "type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}})


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def answers(url: str, constrained: bool = False) -> dict:
    """What both servers must answer alike (ids and timestamps aside)."""
    api = client(url)
    chat = api.chat.completions.create(**CHAT)
    response = api.responses.create(**RESPONSE)
    # The next turn prefills only what is new: every rank rewinds its prompt cache alike.
    turn = api.responses.create(**dict(RESPONSE, input="And then?"),
                                previous_response_id=response.id)
    out = {"chat": [chat.choices[0].message.model_dump(), chat.choices[0].finish_reason,
                    chat.usage.completion_tokens],
           "response": [response.output_text, response.status, response.usage.output_tokens,
                        [item.type for item in response.output]],
           "turn": [turn.output_text, turn.usage.input_tokens, turn.usage.output_tokens,
                    turn.usage.input_tokens_details.cached_tokens]}
    if constrained:
        answer = api.responses.create(**CONSTRAINED)
        out["constrained"] = [answer.output_text, answer.status]
    return out


def cancel_a_stream(url: str) -> None:
    """Start a long streamed chat, read until its first delta, then hang up."""
    body = dict(CHAT, max_tokens=100000, stream=True)
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ") and '"delta": {"' in line and '"role"' not in line:
                break
        else:
            pytest.fail("the stream ended before its first delta")


@contextmanager
def two_rank_server(model: Path, tmp_path: Path, *extra: str) -> Iterator[tuple[str, list]]:
    """`serve` on 2 ranks; yields rank 0's URL and the processes (stopped by the caller)."""
    hostfile = local_hostfile(2, tmp_path / "hosts.json")
    argv = [sys.executable, "-c", CLI, "serve", "-m", str(model), "--port", "0", "--dtype",
            "float32", "--served-model-name", NAME, *extra]
    procs = [subprocess.Popen(argv, env=rank_env(r, hostfile), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    watchdog = threading.Timer(SAFETY_TIMEOUT * 2, lambda: [p.kill() for p in procs])
    watchdog.start()
    try:
        url = procs[0].stdout.readline().strip()  # printed once rank 0 listens
        assert url.startswith("http://127.0.0.1:"), procs[0].communicate()[1][-3000:]
        yield url, procs
    finally:
        watchdog.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory) -> Path:
    """4 layers (2 pipeline stages of both attention kinds), the real vocabulary."""
    return make_chat4(checkpoint_factory)


@pytest.fixture(scope="module")
def one_process_answers(checkpoint) -> dict:
    """The same requests to `serve`'s one-process, one-request-at-a-time server."""
    from mlx_gptoss.loading import load

    model, tokenizer = load(checkpoint, "float32")
    with running(create_app(model, tokenizer, served_name=NAME)) as url:
        return answers(url, constrained=True)


def stop_and_collect(procs: list) -> list[tuple[int, str]]:
    """Ctrl-C for rank 0 (as for a server on one machine); every rank then exits by itself."""
    procs[0].send_signal(signal.SIGINT)
    return [(p.wait(SAFETY_TIMEOUT), p.communicate()[1]) for p in procs]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["expert", "pipeline"])
def test_two_ranks_serve_as_one_process(parallel, checkpoint, one_process_answers, tmp_path):
    with two_rank_server(checkpoint, tmp_path, "--parallel", parallel) as (url, procs):
        first = answers(url, constrained=parallel == "expert")
        cancel_a_stream(url)  # a follower left inside a collective would hang what follows
        second = answers(url)
        status = stop_and_collect(procs)
    expected = dict(one_process_answers)
    if parallel != "expert":
        expected.pop("constrained")
    assert first == expected
    assert second == {k: v for k, v in expected.items() if k != "constrained"}
    assert first["chat"][2] == 12 and first["response"][2] == 10  # real generations
    assert 0 < first["turn"][3] < first["turn"][1]  # the continuation reused the cache
    (code0, err0), (code1, err1) = status
    assert "serving across 2 ranks: one request decodes at a time" in err0
    assert code1 == 0, err1[-3000:]  # released by rank 0's stop, not by a lost connection
    assert code0 == 0, err0[-3000:]
    assert "Traceback" not in err0 + err1


def test_jobs_cross_ranks_as_json():
    """A job survives the JSON trip; a constrained one keeps the processor path on followers."""
    options = {"max_tokens": 7, "sampling": SamplingParams(temperature=0.5, seed=3),
               "logits_processors": [lambda tokens, logits: logits]}
    job = json.loads(json.dumps(job_message([1, 2, 3], options)))
    follower = job_options(job)
    assert job["prompt"] == [1, 2, 3] and follower["max_tokens"] == 7
    assert follower["sampling"] == options["sampling"]
    assert len(follower["logits_processors"]) == 1
    assert "logits_processors" not in job_options(job_message([1], {"max_tokens": 1}))


@pytest.mark.slow
def test_a_lost_follower_stops_the_server(checkpoint, tmp_path):
    """Rank 1 killed mid-stream: the client is told, rank 0 exits 2 with one line."""
    with two_rank_server(checkpoint, tmp_path) as (url, procs):
        body = dict(CHAT, max_tokens=100000, stream=True)
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as stream:
            lines = stream.iter_lines()
            for line in lines:
                if '"delta": {"content"' in line:
                    break
            procs[1].kill()
            tail = [line for line in lines if line.startswith("data: ")]
        assert any('"rank_lost"' in line for line in tail), tail[-3:]
        _, err = procs[0].communicate(timeout=60)
    assert procs[0].returncode == 2, err[-3000:]
    assert "error: rank 0/2: lost the connection to another rank" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_follower_that_loses_rank_0_exits(checkpoint, tmp_path):
    with two_rank_server(checkpoint, tmp_path) as (url, procs):
        assert client(url).chat.completions.create(**CHAT).usage.completion_tokens == 12
        procs[0].kill()
        _, err = procs[1].communicate(timeout=60)
    assert procs[1].returncode == 2, err[-3000:]
    assert "error: rank 1/2: lost the connection to another rank" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_serve_under_mlx_launch(checkpoint, one_process_answers, tmp_path):
    """`mlx.launch -n 2 -- mlx-gptoss serve`: the one-process answers; a terminal's Ctrl-C (to
    the whole process group) stops every rank without a warning from the launcher."""
    import os

    port = json.loads(local_hostfile(1, tmp_path / "port.json").read_text())[0][0].split(":")[1]
    launcher = Path(sys.executable).with_name("mlx.launch")
    argv = [str(launcher), "--backend", "ring", "-n", "2", "--starting-port", port, "--",
            sys.executable, "-c", CLI, "serve", "-m", str(checkpoint), "--port", "0",
            "--dtype", "float32", "--served-model-name", NAME]
    launch = subprocess.Popen(argv, env=CLI_ENV, start_new_session=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        url = launch.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), launch.communicate(timeout=60)[1][-3000:]
        got = answers(url)
        os.killpg(launch.pid, signal.SIGINT)
        _, err = launch.communicate(timeout=SAFETY_TIMEOUT)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
    assert got == {k: v for k, v in one_process_answers.items() if k != "constrained"}
    assert "Node with rank" not in err, err[-3000:]  # mlx.launch's note of a failed rank


def test_lockstep_ends_where_rank_0_says(chat_model):
    """On one process (the collectives are identities): the events of `stream_generate`, cut
    where `stop()` says, and a failed constraint raised once the ranks have stopped."""
    import mlx.core as mx

    from mlx_gptoss.cache import PromptCache
    from mlx_gptoss.generate import GenerationResult, stream_generate
    from mlx_gptoss.server.worker import lockstep_generation

    model, tok = chat_model
    group = mx.distributed.init()
    options = {"max_tokens": 6, "sampling": SamplingParams(temperature=0)}

    def run(stop=lambda: False, **extra):
        return list(lockstep_generation(model, tok, PromptCache.for_model(model), group, "Hi",
                                        {**options, **extra}, stop=stop))

    def tokens(events):
        return next(e for e in events if isinstance(e, GenerationResult)).tokens

    alone = list(stream_generate(model, tok, "Hi", **options))
    assert tokens(run()) == tokens(alone) and len(tokens(alone)) == 6
    asked = iter(range(100))
    cut = run(stop=lambda: next(asked) >= 3)  # asked before each event: stop at the 4th
    assert len(alone) > 4 and cut == alone[:3]  # the 4th event was not let through

    def broken(generated, logits):
        if generated:
            raise ValueError("the constraint broke")
        return logits

    with pytest.raises(ValueError, match="the constraint broke"):
        run(logits_processors=[broken])


def test_a_taken_port_is_one_line_at_once():
    """Rank 0 serves from a thread, where uvicorn would only log a failed bind: checked first."""
    import socket

    from mlx_gptoss.cli.serve import _check_address
    from mlx_gptoss.errors import GptOssError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(GptOssError, match=f"cannot serve on 127.0.0.1:{port}: Address "
                                              "already in use"):
            _check_address("127.0.0.1", port)
    _check_address("127.0.0.1", 0)
