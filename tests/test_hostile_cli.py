"""Every flag of ``demo``, ``show``, ``sensitivity`` and ``bench`` given a bad value (issue
23, items 3 and 5): exit status 2, exactly one line on stderr naming the flag as the user
typed it (``--T``, not ``T``; ``IMAGE`` for show's source), nothing on stdout, nothing
written, and no work started (the function that would do it is replaced by one that
fails the test). Path flags are tried with the empty path, a missing path, a FIFO (which
would block a reader forever), a folder, a file where a folder is needed, a folder that
does not exist and a place nobody can write (``/proc``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hangs import within

from diffeo_engine import cli, flags

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Hostile files built from scratch, and one good 28x28 grey data set."""
    root = tmp_path_factory.mktemp("hostile")
    g = torch.Generator().manual_seed(23)
    coarse = torch.rand(12, 1, 7, 7, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear")
    np.save(root / "good.npy", (images[:, 0] * 255).round().to(torch.uint8).numpy())
    np.save(root / "empty.npy", np.zeros((0, 28, 28), np.uint8))
    (root / "zero.npy").write_bytes(b"")
    (root / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "text.txt").write_text("keep")
    (root / "folder").mkdir()
    os.mkfifo(root / "fifo")
    os.mkfifo(root / "fifo.png")
    os.mkfifo(root / "fifo.py")
    (root / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64)}, str(root / "whole.safetensors"))
    whole = (root / "whole.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(whole[: len(whole) - 100])
    torch.save({"net": torch.nn.Linear(2, 2)}, root / "pickled.pt")
    (root / "notjson.json").write_text("not json")
    (root / "list.json").write_text("[1, 2]")
    (root / "other.json").write_text(json.dumps({"schema": "diffeo-engine-static/1"}))
    damaged = {"schema": "diffeo-engine-bench/1", "device": {"name": "cpu"},
               "copy_bandwidth_GBps": 10.0, "results": [{"provider": "fused"}]}  # fmt: skip
    (root / "damaged.json").write_text(json.dumps(damaged))
    (root / "broken.py").write_text("def factory(:\n")
    names = ["good.npy", "empty.npy", "zero.npy", "fake.png", "text.txt", "folder", "fifo",
             "fifo.png", "fifo.py", "bad.safetensors", "cut.safetensors", "pickled.pt",
             "notjson.json", "list.json", "other.json", "damaged.json", "broken.py"]  # fmt: skip
    out = {name: str(root / name) for name in names}
    out["missing"] = str(root / "missing")
    out["root"] = str(root)
    return out


def _refused(argv, flag: str, words: str, capsys, tmp_path) -> str:
    """Run ``argv``; assert exit 2, one stderr line naming ``flag`` (and ``words``), no
    stdout, nothing new in ``tmp_path``."""
    before = sorted(p.name for p in tmp_path.iterdir())
    code = within(60, lambda: cli.main([str(a) for a in argv]))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (" ".join(map(str, argv)), captured.err)
    assert len(lines) == 1 and "Traceback" not in captured.err, (argv, captured.err)
    line = lines[0]
    forms = (f"error: {flag}: ", f"error: argument {flag}", f"arguments are required: {flag}")
    named = any(form in line for form in forms)
    assert named and words in line, (argv, line)
    assert captured.out == "", (argv, captured.out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, argv
    return lines[0]


def _no_work(monkeypatch, module, *names):
    def fail(*args, **kwargs):
        raise AssertionError("work started before every flag was checked")

    for name in names:
        monkeypatch.setattr(module, name, fail)


def _out_cases(files, flag="--out", suffix=".png"):
    """Bad output paths and the words the refusal must contain."""
    return [
        ("", "expected a path"),
        (f"/proc/x{suffix}", "cannot write in /proc"),
        (f"{files['missing']}/x{suffix}", "does not exist"),
        (f"{files['text.txt']}/x{suffix}", "is a file"),
        (files["fifo.png"], "FIFO"),
    ]


# ------------------------------------------------------------------------------- demo


def _demo_cases(files):
    cases = [
        (["--T", value], "--T", words)
        for value, words in (
            ("-1", ">= 0"),
            ("nan", "finite"),
            ("inf", "finite"),
            ("1e39", "1e+39"),
            ("1e30", "displacement"),
            ("abc", "invalid float"),
        )
    ]
    cases += [
        (["--cut", value], "--cut", words)
        for value, words in (
            ("0", ">= 2"),
            ("1", "log 1 = 0"),
            ("abc", "invalid int"),
            ("100", "above 2 n / pi"),
        )
    ]
    cases += [(["--seed", v], "--seed", "2**63") for v in ("-1", str(2**63))]
    cases += [(["--batch-size", v], "--batch-size", ">= 1") for v in ("0", "-4")]
    cases += [(["--size", v], "--size", ">= 2") for v in ("1", "0")]
    cases += [(["--size", "100000"], "--size", "GB of memory")]
    cases += [(["--batch-size", str(10**12)], "--batch-size", "GB of memory")]
    cases += [(["--device", "gpu"], "--device", "'gpu'"), (["--device", "meta"], "--device", "")]
    if NO_CUDA:
        cases += [(["--device", "cuda"], "--device", "CUDA is not available")]
    cases += [(["--backend", "cpu"], "--backend", "invalid choice")]
    cases += [(["--out", value], "--out", words) for value, words in _out_cases(files)]
    cases += [
        (["--out", files["folder"]], "--out", "is a folder"),
        (["--out", files["text.txt"]], "--out", "picture file"),
    ]
    return cases


def test_every_demo_flag_with_a_bad_value(files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _no_work(monkeypatch, cli, "demo_images")
    for extra, flag, words in _demo_cases(files):
        _refused(["demo", *extra], flag, words, capsys, tmp_path)


# ------------------------------------------------------------------------------- show


def test_every_show_flag_with_a_bad_value(files, capsys, tmp_path, monkeypatch):
    import diffeo_engine.pictures as pictures

    monkeypatch.chdir(tmp_path)
    _no_work(monkeypatch, pictures, "save_perturbation_figure")
    good = files["good.npy"]
    base = ["show", good, "--out", tmp_path / "s.png"]
    cases = [
        (["show", value, "--out", tmp_path / "s.png"], "IMAGE", words)
        for value, words in (
            ("", "expected a path"),
            (files["missing"], "no such file"),
            (files["fifo"], "FIFO"),
            (files["zero.npy"], "file is empty"),
            (files["empty.npy"], "holds no images"),
            (files["fake.png"], "not a readable image"),
        )
    ]
    cases += [([*base, "--index", v], "--index", w) for v, w in (("-1", ">= 0"), ("12", "[0, 12)"))]
    cases += [([*base, "--index", "abc"], "--index", "invalid int")]
    cases += [([*base, "--cut", v], "--cut", w) for v, w in (("0", ">= 2"), ("20", "2 n / pi"))]
    cases += [([*base, "--seed", "-1"], "--seed", "2**63")]
    cases += [
        ([*base, "--resize", v], "--resize", w)
        for v, w in (("abc", "HxW"), ("0x0", ">= 2"), ("100000x100000", "GB of memory"))
    ]
    cases += [([*base, "--device", "gpu"], "--device", "'gpu'")]
    cases += [
        (["show", good, "--out", value], "--out", words) for value, words in _out_cases(files)
    ]
    cases += [(["show", good], "--out", "required")]
    for argv, flag, words in cases:
        _refused(argv, flag, words, capsys, tmp_path)


# ------------------------------------------------------------------------ sensitivity


def _sensitivity(files, out, *extra):
    return ["sensitivity", "--model", "lenet", "--data", files["good.npy"], "--out", out,
            "--no-progress", "--no-plot", "--batch-size", "6", *extra]  # fmt: skip


def _sensitivity_cases(files, out):
    def with_flag(flag, value):
        argv = _sensitivity(files, out)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
            return argv
        return [*argv, flag, value]

    table = {
        "--T": [("-1", ">= 0"), ("nan", "finite"), ("1e39", "float32"),
                ("1e30", "displacement")],
        "--cut": [("0", ">= 2"), ("100", "2 n / pi"), ("abc", "invalid int")],
        "--seed": [("-1", "2**63")],
        "--batch-size": [("0", ">= 1")],
        "--per-image": [("0", ">= 1")],
        "--error-groups": [("0", ">= 1")],
        "--limit": [("1", ">= 2")],
        "--noise": [("abc", "'abc'"), ("-1", ">= 0"), ("inf", "finite")],
        "--scale": [("abc", "'abc'"), ("nan", "'nan'"), ("0", "> 0"), ("-2", "> 0"),
                    ("inf", "> 0")],
        "--mean": [("inf", "finite"), ("nan", "finite")],
        "--std": [("0", "> 0"), ("nan", "finite"), ("-1", "> 0")],
        "--resize": [("abc", "HxW"), ("0x0", ">= 2"), ("100000x100000", "GB of memory")],
        "--dist-timeout": [("0", "> 0"), ("nan", "finite")],
        "--layers": [("nosuch", "no module names")],
        "--model": [("nosuch", "unknown model"), (files["fifo.py"] + ":f", "FIFO"),
                    (files["broken.py"] + ":factory", "fails to import")],
        "--model-arg": [("x", "KEY=VALUE"), ("nosuch=3", "nosuch")],
        "--weights": [("", "expected a path"), (files["missing"], "no such file"),
                      (files["fifo"], "FIFO"), (files["folder"], "directory"),
                      (files["bad.safetensors"], "not a readable .safetensors"),
                      (files["cut.safetensors"], "not a readable .safetensors"),
                      (files["pickled.pt"], "pickled Python objects")],
        "--data": [("", "expected a path"), (files["missing"], "no such file"),
                   (files["fifo"], "FIFO"), (files["empty.npy"], "holds no images"),
                   (files["zero.npy"], "file is empty")],
        # (a folder may be new, with its parents: only a file's folder must exist)
        "--out": [(v, w) for v, w in _out_cases(files, suffix="") if w != "does not exist"]
        + [(files["text.txt"], "not a folder")],
        "--reduce": [("mean", "invalid choice")],
        "--device": [("gpu", "'gpu'")],
    }  # fmt: skip
    cases = [
        (with_flag(flag, value), flag, words)
        for flag, values in table.items()
        for value, words in values
    ]
    cases.append(([*_sensitivity(files, out), "--T", "0.01", "0.01"], "--T", "given twice"))
    cases.append(([*_sensitivity(files, out), "--cut", "3", "3"], "--cut", "given twice"))
    cases.append(([*_sensitivity(files, out), "--mean", "0.1", "0.2"], "--mean", "one per channel"))
    cases.append(([*_sensitivity(files, out), "--std", "1", "2", "3"], "--std", "one per channel"))
    return cases


def test_every_sensitivity_flag_with_a_bad_value(files, capsys, tmp_path, monkeypatch):
    """The notes (untrained network, inferred arguments, jackknife groups) come only after
    every flag has been checked, so a refusal is the only line."""
    from diffeo_engine.sensitivity import meter as meter_module

    monkeypatch.chdir(tmp_path)
    _no_work(monkeypatch, meter_module.SensitivityMeter, "update")
    out = tmp_path / "o"
    for argv, flag, words in _sensitivity_cases(files, out):
        _refused(argv, flag, words, capsys, tmp_path)
    assert not out.exists()


# ------------------------------------------------------------------------------ bench


def test_every_bench_flag_with_a_bad_value(files, capsys, tmp_path, monkeypatch):
    from diffeo_engine.benchmark import command

    monkeypatch.chdir(tmp_path)
    _no_work(monkeypatch, command, "run_benchmarks", "merge_results")
    base = ["bench", "--smoke", "--providers", "torch-reference", "--shapes", "1x1x8x8"]
    cases = [
        (["bench", "--merge", value], "--merge", words)
        for value, words in (
            ("", "expected a path"),
            (files["missing"], "no such file"),
            (files["fifo"], "FIFO"),
            (files["folder"], "directory"),
            (files["notjson.json"], "not JSON"),
            (files["list.json"], "not a bench result"),
            (files["other.json"], "diffeo-engine-static/1"),
            (files["damaged.json"], "result 0 lacks"),
            (files["good.npy"], "not JSON"),
        )
    ]
    cases += [
        ([*base, "--out", value], "--out", words)
        for value, words in _out_cases(files, suffix=".json")
    ]
    cases += [([*base, "--cut", "0"], "--cut", ">= 1"), ([*base, "--seed", "-1"], "--seed", "")]
    cases += [([*base, "--dtypes", "int8"], "--dtypes", "unknown ['int8']")]
    cases += [([*base, "--providers", "nosuch"], "--providers", "unknown ['nosuch']")]
    cases += [(["bench", "--shapes", "0x1x8x8"], "--shapes", "BxCxHxW")]
    cases += [(["bench", "--smoke", "--shapes", "1000000x3x1024x1024"], "--shapes", "GB")]
    cases += [(["bench", "--static", "--targets", "0"], "--targets", "[80, 90]")]
    cases += [([*base, "--timer", "wall"], "--timer", "invalid choice")]
    cases += [([*base, "--device", "gpu"], "--device", "'gpu'")]
    for argv, flag, words in cases:
        _refused(argv, flag, words, capsys, tmp_path)


def test_an_out_folder_may_be_new_but_a_files_folder_must_exist(tmp_path):
    cli.check_out("bench", str(tmp_path / "new" / "deeper") + "/")  # a folder: made later
    cli.check_out("sensitivity", str(tmp_path / "a" / "b"))
    cli.check_out("demo", str(tmp_path / "d.png"))
    for command, out in (("bench", "new/run.json"), ("demo", "new/d.png")):
        with pytest.raises(cli.UsageError, match="does not exist"):
            cli.check_out(command, str(tmp_path / out))
    assert list(tmp_path.iterdir()) == []  # the write probe leaves nothing


# --------------------------------------------------------------------- the mechanisms


def test_argument_names_are_spelled_as_the_flags_of_each_command():
    assert cli.spelled("cut: expected an integer", "demo") == "--cut: expected an integer"
    assert cli.spelled("T, cut: the setting", "sensitivity") == "--T, --cut: the setting"
    assert cli.spelled("settings: given twice", "sensitivity") == "--T, --cut: given twice"
    assert cli.spelled("input: no such file", "show") == "IMAGE: no such file"
    assert cli.spelled("input: no such file", "sensitivity") == "--data: no such file"
    assert cli.spelled("per_image: expected", "sensitivity") == "--per-image: expected"
    assert (
        cli.spelled("docs: expected runs on one device", "bench")
        == "--merge: expected runs on one device"
    )
    for text in ("/tmp/x: not readable", "layer 'fc': NaN", "no colon here", "ids: kept"):
        assert cli.spelled(text, "sensitivity") == text  # not an argument: left alone
    for name, flag in flags.FLAGS.items():  # the table holds flags the commands really have
        assert flag.startswith("--") and name.isidentifier()
    parser = cli.build_parser()
    options = set()
    for action in parser._subparsers._group_actions[0].choices.values():
        options |= {o for a in action._actions for o in a.option_strings}
    missing = [f for f in flags.FLAGS.values() if f not in options]
    assert not missing, missing


def test_every_path_flag_of_these_commands_is_in_the_table():
    """The class: each command's arguments that name files or folders are all checked first
    (a new path flag must be added to PATH_FLAGS)."""
    parser = cli.build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    pathlike = ("out", "data", "weights", "merge", "source", "model", "input", "labels")
    for command in cli.PATH_FLAGS:
        dests = {a.dest for a in subcommands[command]._actions}
        listed = {attribute for attribute, _, _ in cli.PATH_FLAGS[command]}
        assert {d for d in dests if d in pathlike} <= listed, command
