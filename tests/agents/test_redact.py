"""redact(): configured secrets and key-shaped tokens become [REDACTED]; ordinary text is left alone."""

import base64
import random

import pytest

from distillkit.agents.redact import REDACTED, redact, secrets_from_environment

ANTHROPIC_SHAPED = "sk-ant-api03-" + "Xy7_kQ2-pL9mZ4vB8nR1tW6cD3fG5hJ0aS2dF4gH6jK8lZ0xC2vB4nM6qW8eR0tY2uI4oP6aS8dF0gH2jK4lZ6xC8vB0n" + "-AA"
RANDOM = random.Random(0)
BASE64_KEY = base64.b64encode(bytes(RANDOM.randrange(256) for _ in range(30))).decode()  # 40 characters
HEX_KEY = "".join(RANDOM.choice("0123456789abcdef") for _ in range(40))


@pytest.mark.parametrize("text, expected", [
    pytest.param(f"bad key {ANTHROPIC_SHAPED} given", f"bad key {REDACTED} given", id="sk-ant"),
    pytest.param("short sk-ant-abc123xyz in text", f"short {REDACTED} in text", id="sk-ant-short"),
    pytest.param("openai sk-proj-Ab3dEf6hIj9kLm2nOp5q", f"openai {REDACTED}", id="sk-long"),
    pytest.param("Authorization: Bearer eyJhbGciOi.eyJzdWIi.SflKxw", f"Authorization: Bearer {REDACTED}",
                 id="bearer-jwt"),
    pytest.param("bearer abcdef0123456", f"bearer {REDACTED}", id="bearer-lowercase"),
    pytest.param("x-api-key: abc123", f"x-api-key: {REDACTED}", id="x-api-key-header"),
    pytest.param("X-Api-Key=hunter2pass", f"X-Api-Key={REDACTED}", id="x-api-key-assignment"),
    pytest.param("connect(api_key=abc123def, timeout=3)", f"connect(api_key={REDACTED}, timeout=3)",
                 id="api_key-kwarg"),
    pytest.param("https://h/v1?apikey=zz9&page=2", f"https://h/v1?apikey={REDACTED}&page=2", id="url-query"),
    pytest.param('{"auth_token": "tok-77", "user": "bob"}', f'{{"auth_token": "{REDACTED}", "user": "bob"}}',
                 id="json-auth_token"),
    pytest.param("{'password': 'hunter2'}", f"{{'password': '{REDACTED}'}}", id="python-dict-password"),
    pytest.param("client_secret = s3cr3t", f"client_secret = {REDACTED}", id="client_secret"),
    pytest.param(f"key {BASE64_KEY} end", f"key {REDACTED} end", id="base64-40"),
    pytest.param(f"digest {HEX_KEY}", f"digest {REDACTED}", id="hex-40"),
    pytest.param("ghp_16C7e42F292c6912E7710c838347Ae178B4a", f"ghp_{REDACTED}", id="github-token-body"),
])
def test_key_shaped_tokens_are_redacted(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "InternalServerError (HTTP 500): Error code: 500 - {'type': 'error', 'error': {'type': 'api_error', "
    "'message': 'internal'}}",
    "AuthenticationError (HTTP 401): {'type': 'authentication_error', 'message': 'invalid x-api-key'}",
    "Could not resolve authentication method. Expected either api_key or auth_token to be set.",
    "api_key=None", "password: null", "missing Bearer token", "Bearer authentication failed",
    "request_id req_011CKmZ5kfvJz1y9XYZabc, message id msg_01XFDUDYJgAACzvnptvVoYEL",
    "uuid 550e8400-e29b-41d4-a716-446655440000",
    "unexpected keyword max_tokens=1024 and tokens: 5",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B-GGUF not found",
    "AnthropicInternalServerError2024HandlerFactory raised",
    "/home/User/Projects/DistillKit2/data/cache/shard-00001.safetensors: sha256 mismatch",
    "test_malformed_index_names_the_file_and_field0",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB",
    "desk-organizer-with-very-long-hyphenated-product-name",
    "sha 1234abcd",
    "",
])
def test_ordinary_text_is_unchanged(text):
    assert redact(text) == text


def test_configured_secrets_are_redacted_wherever_they_appear():
    secret = "plain0configured0value"  # not key-shaped: only the configured list can catch it
    assert redact(f"rejected {secret}!") == f"rejected {secret}!"
    assert redact(f"rejected {secret}!", [secret]) == f"rejected {REDACTED}!"
    assert redact(f"a{secret}b{secret}", [secret, None, ""]) == f"a{REDACTED}b{REDACTED}"
    # longest first: a secret containing another is replaced whole
    assert redact("token abcdefgh-12345678", ["abcdefgh", "abcdefgh-12345678"]) == f"token {REDACTED}"
    assert redact(redact(f"x {ANTHROPIC_SHAPED}")) == f"x {REDACTED}"  # idempotent


def test_secrets_from_environment():
    environ = {"ANTHROPIC_API_KEY": "env-secret-value", "HF_TOKEN": "hf_abcdefgh", "MY_SERVICE_SECRET": "s" * 9,
               "DB_PASSWORD": "correct-horse", "DEBUG_TOKEN": "1", "HOME": "/home/someone", "EMPTY_API_KEY": "",
               "PATH": "/usr/bin:/bin"}
    assert sorted(secrets_from_environment(environ)) == sorted(
        ["env-secret-value", "hf_abcdefgh", "s" * 9, "correct-horse"])
