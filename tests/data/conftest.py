"""Fixtures of the distillkit.data tests: the tokenizers of trajectory_samples.py, built once."""

import pytest
from trajectory_samples import CHAT_TEMPLATE, build_bpe_json, wrap


@pytest.fixture(scope="session")
def bpe_json():
    return build_bpe_json()


@pytest.fixture(scope="session")
def plain_tok(bpe_json):
    return wrap(bpe_json, eos_token="<|endoftext|>", pad_token="<|endoftext|>")  # pad == eos on purpose


@pytest.fixture(scope="session")
def chat_tok(bpe_json):
    tok = wrap(bpe_json, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok

