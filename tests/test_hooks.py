"""afa.engine.hooks: the stop flag. A stop signal only sets it, even in the middle of a log write;
the training loop logs it (the trainer's runs under signals are in test_trainer_faults.py)."""

import logging
import os
import signal

import pytest

from afa.engine.hooks import StopFlag


@pytest.mark.cpu_only
def test_a_stop_signal_during_a_log_write_is_logged_after_it():
    """A signal arrives between any two bytecodes, also while a log handler writes train.log.
    The handler used to log from there: a reentrant call into that buffered file, a RuntimeError
    traceback in the run's output (seen in CI). It now only sets the flag; the loop logs it."""
    written, depth = [], [0]

    class Stream:
        def write(self, text):
            depth[0] += 1
            written.append((depth[0], text))
            if len(written) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # handled before the next bytecode
            depth[0] -= 1

        def flush(self):
            pass

    handler = logging.StreamHandler(Stream())
    logger = logging.getLogger("afa")
    logger.addHandler(handler)
    try:
        with StopFlag() as stop:
            logger.warning("iter 3/6")
            assert stop.signum == signal.SIGTERM
            assert all(d == 1 for d, _ in written), written  # nothing written from within a write
            assert stop.requested() and stop.requested()
    finally:
        logger.removeHandler(handler)
    messages = [text for _, text in written if text.strip()]
    assert messages[0].startswith("iter 3/6")
    assert sum("SIGTERM received: stopping" in m for m in messages) == 1
