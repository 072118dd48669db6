"""collect_teacher_trajectories: the Anthropic backend against a local fake Messages API server
(tool_use turn then final text; a 429 then success; a permanent 500; errors that leak keys), and the
local HF backend."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

anthropic = pytest.importorskip("anthropic")

from distillkit.agents.collect import RetryPolicy, collect_teacher_trajectories  # noqa: E402
from distillkit.agents.redact import REDACTED  # noqa: E402
from distillkit.demo.env import TOOL_SPECS, make_tools  # noqa: E402

API_KEY = "sk-ant-test-secret-0123456789"
PLAIN_KEY = "plain0configured0key0value"  # not key-shaped: only redacting the configured key catches it
UNCONFIGURED_KEY = "sk-ant-api03-Zq8vX2mN5bL7kJ4hG1fD9sA6pO3iU0yT-AA"  # in an error, but not the client's
VAULT_PASSWORD = "vault0pass0phrase"
MAX_REQUESTS = 40


def _message(content, stop_reason):
    return {"id": "msg_fake", "type": "message", "role": "assistant", "model": "fake-teacher",
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5}}


class FakeMessagesAPI(BaseHTTPRequestHandler):
    """Speaks POST /v1/messages. The scenario is the user's first message prefix:

    ok: ...     thinking + text + tool_use (calc 2+3), then, once the tool result is sent, a final text;
    flaky: ...  the first request is answered 429 (retry-after: 0), then as "ok";
    down: ...   always 500;
    echo: ...   always 500, the error message echoing the API key it was sent;
    leak: ...   always 500, the error message holding UNCONFIGURED_KEY;
    vault: ...  tool_use of the "vault" tool, then a final text.
    """

    def log_message(self, *args):  # keep the test output quiet
        pass

    def _send(self, status, payload, headers=()):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        state = self.server.state
        with state["lock"]:
            state["requests"] += 1
            count = state["requests"]
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        bearer = (self.headers.get("authorization") or "").removeprefix("Bearer ")
        state["log"].append({"path": self.path, "api_key": self.headers.get("x-api-key") or bearer, "body": body})
        if count > MAX_REQUESTS:
            return self._send(500, {"type": "error", "error": {"type": "api_error", "message": "request budget"}})
        if self.path.split("?")[0] != "/v1/messages":
            return self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})
        query = body["messages"][0]["content"]
        scenario = query.split(":")[0]
        if scenario == "down":
            return self._send(500, {"type": "error", "error": {"type": "api_error", "message": "internal"}})
        if scenario in ("echo", "leak"):
            key = state["log"][-1]["api_key"] if scenario == "echo" else UNCONFIGURED_KEY
            return self._send(500, {"type": "error", "error": {"type": "api_error",
                                                               "message": f"upstream rejected key {key}"}})
        if scenario == "flaky":
            with state["lock"]:
                first = query not in state["flaky_seen"]
                state["flaky_seen"].add(query)
            if first:
                return self._send(429, {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
                                  headers=[("retry-after", "0")])
        last = body["messages"][-1]
        if last["role"] == "user" and isinstance(last["content"], list):
            result = last["content"][0]
            assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_1"
            return self._send(200, _message([{"type": "text", "text": f"The answer is {result['content']}."}],
                                            "end_turn"))
        if scenario == "vault":
            return self._send(200, _message([{"type": "tool_use", "id": "toolu_1", "name": "vault", "input": {}}],
                                            "tool_use"))
        assert body["tools"] and body["tools"][0]["name"] == "calc"
        return self._send(200, _message([
            {"type": "thinking", "thinking": "I should add the numbers.", "signature": "sig"},
            {"type": "text", "text": "Let me compute."},
            {"type": "tool_use", "id": "toolu_1", "name": "calc", "input": {"expr": "2+3"}},
        ], "tool_use"))


@pytest.fixture
def fake_api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeMessagesAPI)
    server.state = {"requests": 0, "log": [], "flaky_seen": set(), "lock": threading.Lock()}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def client_for(server):
    return anthropic.Anthropic(api_key=API_KEY, base_url=f"http://127.0.0.1:{server.server_address[1]}",
                               max_retries=3, timeout=10)


def test_anthropic_backend_tool_loop_retry_and_failure(fake_api, tmp_path, caplog):
    slept = []
    out_path = tmp_path / "trajectories.jsonl"
    with caplog.at_level(logging.DEBUG):
        trajectories = collect_teacher_trajectories(
            ["ok: what is 2+3?", "flaky: what is 2+3?", "down: what is 2+3?"], client_for(fake_api), make_tools(),
            model="fake-teacher", tool_specs=TOOL_SPECS, max_retries=2, backoff=0.01, sleep=slept.append,
            out_path=out_path, progress=False)
    ok, flaky, down = trajectories
    for t in (ok, flaky):
        assert "error" not in t
        assert t["answer"] == "The answer is 5."
        assert t["steps"] == [{"reasoning": "I should add the numbers.\nLet me compute.",
                               "tool_call": {"name": "calc", "arguments": {"expr": "2+3"}}, "tool_result": "5"}]
    assert down["answer"] is None and down["steps"] == []
    assert "InternalServerError" in down["error"] and "500" in down["error"]

    log = fake_api.state["log"]
    bodies = {}
    for entry in log:
        bodies.setdefault(entry["body"]["messages"][0]["content"].split(":")[0], []).append(entry)
    assert len(bodies["ok"]) == 2  # tool_use turn, then the final turn
    assert len(bodies["flaky"]) == 3  # 429, then the two turns
    assert len(bodies["down"]) == 3  # first try + max_retries=2: the client's own retries are off
    assert fake_api.state["requests"] == 8 <= MAX_REQUESTS
    # the second turn echoes the assistant blocks (thinking with its signature) and answers the tool call
    second = bodies["ok"][1]["body"]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"][0] == {"type": "thinking", "thinking": "I should add the numbers.",
                                       "signature": "sig"}
    assert second[2]["content"][0]["content"] == "5" and second[2]["content"][0]["is_error"] is False
    assert all(entry["api_key"] == API_KEY for entry in log)
    # retry-after: 0 for the 429; exponential backoff (0.01, 0.02 with jitter) for the 500s
    assert slept[0] == 0.0 and len(slept) == 3
    assert 0.005 <= slept[1] <= 0.01 and 0.01 <= slept[2] <= 0.02

    written = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert written == trajectories
    everything = out_path.read_text() + caplog.text + json.dumps(trajectories)
    assert API_KEY not in everything


def test_retry_policy_classification():
    class Err(Exception):
        def __init__(self, status):
            self.status_code = status

    assert RetryPolicy.retryable(Err(429)) and RetryPolicy.retryable(Err(503)) and RetryPolicy.retryable(Err(529))
    assert not RetryPolicy.retryable(Err(400)) and not RetryPolicy.retryable(Err(401))
    assert not RetryPolicy.retryable(ValueError("x"))
    policy = RetryPolicy(max_retries=5, base=1.0, max_backoff=4.0, jitter=False, sleep=lambda s: None)
    assert [policy.delay(a, Err(500)) for a in range(5)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise Err(429)
        return "done"

    assert policy.call(flaky) == "done" and len(calls) == 3 and policy.delays == [1.0, 2.0]
    with pytest.raises(Err):
        RetryPolicy(max_retries=5, sleep=lambda s: None).call(lambda: (_ for _ in ()).throw(Err(400)))


def test_local_backend(tmp_path):
    pytest.importorskip("tokenizers")
    from test_agent import ScriptedLM, char_tokenizer, scripted

    tok = char_tokenizer()
    model = ScriptedLM(tok, scripted("2+3", 0.9, 0.9))
    out = collect_teacher_trajectories(["What is 2+3?", "Add 2 and 3"], model, make_tools(), tokenizer=tok,
                                       out_path=tmp_path / "t.jsonl", progress=False, batch_size=1)
    for t in out:
        assert t["answer"] == "5" and "error" not in t
        assert t["steps"] == [{"reasoning": "add", "tool_call": {"name": "calc", "arguments": {"expr": "2+3"}},
                               "tool_result": "5"}]
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 2

    def broken(context):
        return "A: calc {not json}\n", 0.9

    bad = collect_teacher_trajectories(["q"], ScriptedLM(tok, broken), make_tools(), tokenizer=tok, progress=False)
    assert bad[0]["answer"] is None and "not JSON" in bad[0]["error"]


# -- redaction: errors that carry a key, raised through the real collection path --------------------

def _collect_and_check(fake_api, client, queries, secret, caplog, tmp_path, **kw):
    """Collect, then check that `secret` is nowhere in the records, the JSONL or the log, and return them."""
    out_path = tmp_path / "out.jsonl"
    with caplog.at_level(logging.DEBUG):
        trajectories = collect_teacher_trajectories(queries, client, make_tools(), model="fake-teacher",
                                                    max_retries=2, backoff=0.0, sleep=lambda s: None,
                                                    out_path=out_path, progress=False, **kw)
    everything = [json.dumps(trajectories), out_path.read_text(), caplog.text,
                  *(record.getMessage() for record in caplog.records)]
    assert not [text for text in everything if secret in text]
    ours = [record.getMessage() for record in caplog.records if record.name == "distillkit.agents.collect"]
    retries = [message for message in ours if "retry" in message]
    assert retries and all(REDACTED in message for message in retries), ours
    assert any("failed:" in message and REDACTED in message for message in ours), ours
    return trajectories


def test_configured_key_is_redacted_from_errors_and_logs(fake_api, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)  # the client's own key must be enough
    client = anthropic.Anthropic(api_key=PLAIN_KEY, base_url=f"http://127.0.0.1:{fake_api.server_address[1]}",
                                 timeout=10)
    (echo,) = _collect_and_check(fake_api, client, ["echo: hi"], PLAIN_KEY, caplog, tmp_path)
    assert fake_api.state["log"][0]["api_key"] == PLAIN_KEY  # the server did get (and echo) the key
    assert echo["answer"] is None and echo["error"].startswith("InternalServerError (HTTP 500)")
    assert f"upstream rejected key {REDACTED}" in echo["error"]


def test_key_from_the_environment_is_redacted(fake_api, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", PLAIN_KEY)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{fake_api.server_address[1]}", timeout=10)
    (echo,) = _collect_and_check(fake_api, client, ["echo: hi"], PLAIN_KEY, caplog, tmp_path)
    assert fake_api.state["log"][0]["api_key"] == PLAIN_KEY and REDACTED in echo["error"]


def test_unconfigured_key_shaped_secret_is_redacted(fake_api, tmp_path, caplog):
    (leak,) = _collect_and_check(fake_api, client_for(fake_api), ["leak: hi"], UNCONFIGURED_KEY, caplog, tmp_path)
    assert f"upstream rejected key {REDACTED}" in leak["error"]


def test_tool_error_with_a_configured_secret_is_redacted(fake_api, tmp_path, caplog):
    def vault():
        """Open the vault."""
        raise PermissionError(f"wrong pass phrase {VAULT_PASSWORD}")

    tools = {**make_tools(), "vault": vault}
    with caplog.at_level(logging.DEBUG):
        (trajectory,) = collect_teacher_trajectories(["vault: open it"], client_for(fake_api), tools,
                                                     model="fake-teacher", secrets=[VAULT_PASSWORD], progress=False)
    assert trajectory["steps"][0]["tool_result"] == f"error: wrong pass phrase {REDACTED}"
    sent = json.dumps([entry["body"] for entry in fake_api.state["log"]])
    assert VAULT_PASSWORD not in sent + json.dumps(trajectory) + caplog.text and REDACTED in sent


def test_local_backend_error_is_redacted(tmp_path, caplog, monkeypatch):
    pytest.importorskip("tokenizers")
    from test_agent import ScriptedLM, char_tokenizer

    hf_token = "hf_local0token0value"
    monkeypatch.setenv("HF_TOKEN", hf_token)

    def crashes(context):
        raise RuntimeError(f"download failed with token {hf_token} and Bearer {UNCONFIGURED_KEY[:30]}")

    tok = char_tokenizer()
    with caplog.at_level(logging.DEBUG):
        (failed,) = collect_teacher_trajectories(["q"], ScriptedLM(tok, crashes), make_tools(), tokenizer=tok,
                                                 progress=False)
    assert failed["error"] == f"RuntimeError: download failed with token {REDACTED} and Bearer {REDACTED}"
    assert hf_token not in caplog.text + json.dumps(failed) and REDACTED in caplog.text
