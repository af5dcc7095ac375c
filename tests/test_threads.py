"""Thread counts (qsamc/threads.py): the option and environment variable, the free-core rule against a real
busy process, re-adapting inside long loops, and the ONNX Runtime sessions that take the count."""

from __future__ import annotations

import subprocess
import sys
import time

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from qsamc import threads
from qsamc.errors import ConfigError
from qsamc.export.ort import ort_session

BUSY = "import time\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    yield
    threads._chosen = None
    torch.set_num_threads(before)


@pytest.fixture
def busy_process():
    """A pure-Python busy loop in another process (one runnable task), running before the test looks."""
    process = subprocess.Popen([sys.executable, "-c", BUSY])
    time.sleep(1.0)
    yield process
    process.kill()
    process.wait()


def test_the_option_wins_then_the_environment_variable(monkeypatch):
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.choose_threads(1) == threads.ThreadChoice(1, "--threads")
    assert threads.choose_threads() == threads.ThreadChoice(3, threads.ENV)
    assert threads.apply_threads().threads == 3 and torch.get_num_threads() == 3
    assert threads.current() == 3


@pytest.mark.parametrize("value, message", [("two", "QSAMC_THREADS must be a whole number of threads, got 'two'"),
                                            ("0", "QSAMC_THREADS must be at least 1, got 0")])
def test_a_bad_environment_value_is_one_sentence(monkeypatch, value, message):
    monkeypatch.setenv(threads.ENV, value)
    with pytest.raises(ConfigError, match=message):
        threads.choose_threads()


def test_cli_refuses_a_bad_thread_count_in_one_sentence(run_cli):
    code, out, err = run_cli("--threads", "0", "space", "--model", "vit_t")
    assert code == 2
    assert err.strip() == "error: --threads must be at least 1, got 0"


def test_cli_says_how_many_threads_a_working_command_runs(run_cli, tmp_path):
    code, out, err = run_cli("--threads", "1", "search", "--supernet", tmp_path / "missing", "--target", "cpu",
                             "--bitops")
    assert code == 2 and err.startswith("error: ")
    assert out.splitlines()[0] == "threads: 1 (--threads)"


def test_a_busy_process_takes_a_core_from_the_automatic_count(busy_process):
    cores = threads.usable_cores()
    assert threads.busy_elsewhere() >= 1
    choice = threads.choose_threads()
    assert choice.threads <= max(cores - 1, 1)
    assert "busy elsewhere" in choice.reason


def test_torchrun_ranks_share_the_cores(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cores = threads.usable_cores()
    assert threads.choose_threads() == threads.ThreadChoice(max(cores // 2, 1), f"{cores} cores shared by 2 ranks")


def test_adapt_follows_a_process_that_starts_later_but_never_overrides_a_fixed_count(monkeypatch):
    monkeypatch.setattr(threads, "ADAPT_EVERY", 0.0)
    threads.apply_threads()
    process = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(1.0)
        threads.adapt()
        assert torch.get_num_threads() <= max(threads.usable_cores() - 1, 1)
        assert threads.current() == torch.get_num_threads()
        threads.apply_threads(2)
        threads.adapt()
        assert torch.get_num_threads() == 2
    finally:
        process.kill()
        process.wait()


def test_verification_sessions_take_the_count_and_do_not_spin_but_timing_sessions_do():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    threads.apply_threads(1)
    options = ort_session(model).get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    timing = ort_session(model, spinning=True).get_session_options()  # sessions that time a model spin
    assert timing.get_session_config_entry("session.intra_op.allow_spinning") == "1"
