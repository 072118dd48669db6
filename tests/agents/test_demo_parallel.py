"""distillkit.demo.parallel.fork_map: forked pieces give what the same pieces give in this process."""

import os

import pytest

from distillkit.demo.parallel import fork_map


def _piece(key):
    name, n = key
    return {"name": name, "squares": [i * i for i in range(n)], "pid": os.getpid()}


def test_forked_results_equal_in_process_results():
    keys = [("a", 3), ("b", 5), ("c", 0), ("d", 7), ("e", 2)]
    forked = fork_map(_piece, keys, workers=3)
    inline = fork_map(_piece, keys, workers=1)
    assert list(forked) == keys  # in the order of the keys
    for key in keys:
        assert {k: v for k, v in forked[key].items() if k != "pid"} == {k: v for k, v in inline[key].items()
                                                                        if k != "pid"}
    assert {r["pid"] for r in inline.values()} == {os.getpid()}
    assert os.getpid() not in {r["pid"] for r in forked.values()}


def test_an_error_in_a_worker_names_the_key_and_the_traceback():
    def piece(key):
        if key == "bad":
            raise ValueError("broken piece")
        return key

    with pytest.raises(RuntimeError, match=r"(?s)bad failed in its worker.*ValueError: broken piece"):
        fork_map(piece, ["ok", "bad"], workers=2)


def test_a_worker_that_dies_is_an_error():
    def piece(key):
        os._exit(3)

    with pytest.raises(RuntimeError, match="the worker died"):
        fork_map(piece, ["x"], workers=2)


def test_the_bar_advances_once_per_key():
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    fork_map(_piece, [("a", 1), ("b", 2)], workers=2, bar=bar)
    assert bar.n == 2
