import io

from diffeo_engine.progress import Progress
from diffeo_engine.versions import versions


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_log_file_gets_whole_lines_and_a_final_count():
    stream = io.StringIO()
    bar = Progress(10, desc="job", stream=stream, log_interval=0.0)
    bar.update(4)
    bar.update(6)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[-1].startswith("job: 10/10 images (100.0%)")
    assert all(line.startswith("job: ") for line in lines)


def test_terminal_redraws_in_place_without_tqdm():
    stream = _Tty()
    bar = Progress(None, desc="job", unit="img", stream=stream, use_tqdm=False)
    bar.interval = 0.0
    bar.update(3)
    bar.close()
    text = stream.getvalue()
    assert text.startswith("job: 3 img") and "\r" in text and text.endswith("\n")


def test_disabled_or_off_terminal_prints_nothing():
    for enabled in (False, None):
        stream = io.StringIO()
        bar = Progress(5, desc="job", stream=stream, enabled=enabled, log_interval=0.0)
        bar.update(5)
        bar.close()
        assert stream.getvalue() == ""


def test_resumed_count_and_eta():
    bar = Progress(100, desc="job", done=50, enabled=False)
    bar.start -= 10.0
    bar.update(10)  # 10 images in 10 s: 40 left at 1/s
    assert "60/100" in bar.line() and "ETA 0:00:40" in bar.line(bar.start + 10.0)


def test_versions_keys():
    import torch

    base = versions()
    assert base["torch"] == torch.__version__ and set(base) == {
        "diffeo_engine",
        "torch",
        "numpy",
        "python",
    }
    full = versions(detail=True)
    assert {"platform", "torch_threads", "triton", "matplotlib"} <= set(full)
