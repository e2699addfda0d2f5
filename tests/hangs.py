"""A guard for tests of calls that could hang (a FIFO or a device read as a file)."""

from __future__ import annotations

import threading


def within(seconds: float, call):
    """``call()``'s result, or its exception re-raised, failing the test if it has not
    returned in ``seconds`` (a read of a FIFO would block forever)."""
    result: dict = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as error:  # handed to the test
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the call hung (it read a FIFO or a device?)"
    if "error" in result:
        raise result["error"]
    return result["value"]
