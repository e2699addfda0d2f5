"""Hostile files, tampered manifests and refused runs (issue 23 items 1-3) for generate,
verify, export, load_generated and repair. Each test builds the hostile case from scratch
and walks its whole class: every file a reader opens, every field of the manifest, every
way a run can fail before its first shard, every path flag.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hangs import within

from diffeo_engine import generate as gen
from diffeo_engine import ops
from diffeo_engine.cli import main
from diffeo_engine.generate import MANIFEST, export, generate, load_generated, read_manifest, verify

K, SEED, N = 2, 3, 5
ARGS = dict(T=[0.01, 0.03], cut=3, per_image=K, seed=SEED, shard_size=6, batch_size=4)
NO_CUDA = not torch.cuda.is_available()


def _images(rng, n: int) -> np.ndarray:
    y, x = np.meshgrid(np.arange(9), np.arange(8), indexing="ij")
    phase = rng.uniform(0, 6, (n, 1, 1, 3))
    waves = 127.5 + 110 * np.sin(x[None, ..., None] / 2.0 + y[None, ..., None] / 3.0 + phase)
    return np.clip(waves + rng.integers(0, 16, (n, 9, 8, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    rng = np.random.default_rng(23)
    path = tmp_path_factory.mktemp("src") / "x.npy"
    np.save(path, _images(rng, N))
    np.save(path.with_name("y.npy"), rng.integers(0, 4, N))
    return path


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> Path:
    """20 ids in shards of 6, 6, 6, 2; labelled."""
    out = tmp_path_factory.mktemp("ref") / "run"
    generate(source, out, **ARGS, labels=source.with_name("y.npy"), progress=False)
    return out


def _copy(reference: Path, tmp_path: Path, name: str = "run") -> Path:
    out = tmp_path / name
    shutil.copytree(reference, out)
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# ------------------------------------------------- item 1: links and special files


def _make_hostile(path: Path, kind: str, outside: Path) -> None:
    """Replace ``path`` by a hostile stand-in of the same name."""
    data = path.read_bytes()
    path.unlink()
    if kind == "link-to-identical-copy":
        copy_ = outside / f"copy-of-{path.name}"
        copy_.write_bytes(data)
        path.symlink_to(copy_)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link-to-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    else:
        raise AssertionError(kind)


WHAT = {
    "link-to-identical-copy": "a symbolic link",
    "fifo": "a FIFO",
    "link-to-dev-zero": "a symbolic link to /dev/zero",
    "folder": "a directory",
}
FILES = [MANIFEST, "tau-00001.npy", "noisy-00001.npy", "label-00001.npy"]


@pytest.mark.parametrize("kind", list(WHAT))
@pytest.mark.parametrize("name", FILES)
def test_only_regular_files_in_the_folder_are_read(source, reference, tmp_path, name, kind):
    """Every reader, every file it opens, every stand-in: refused naming the file, at once."""
    out = _copy(reference, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    _make_hostile(out / name, kind, outside)
    words = f"{name}.*{WHAT[kind]}"
    labels = source.with_name("y.npy")

    def every_item(check):
        data = load_generated(out, check=check)
        return [data[i] for i in range(len(data))]

    readers = {
        "load_generated": lambda: every_item(False),
        "load_generated(check)": lambda: every_item(True),
        "export": lambda: export(out, tmp_path / "exported", format="cifar-c"),
        "resume": lambda: generate(source, out, **ARGS, labels=labels),
    }
    for reader, call in readers.items():
        with pytest.raises(ValueError, match=words) as info:
            within(30, call)
        assert "\n" not in str(info.value), reader
    assert not (tmp_path / "exported").exists()
    for full in (False, True):
        if name == MANIFEST:
            with pytest.raises(ValueError, match=words):
                within(30, lambda f=full: verify(out, full=f))
        else:
            report = within(30, lambda f=full: verify(out, full=f))
            assert report.bad_shards == [1]
            assert any(p.startswith(f"{name}: {WHAT[kind]}") for p in report.problems), (
                report.problems
            )
    if name == MANIFEST:
        with pytest.raises(ValueError, match=words):
            within(30, lambda: gen.repair(out))
        return
    if kind == "folder":  # repair removes files only
        with pytest.raises(ValueError, match=f"{name} is a folder where a shard file belongs"):
            within(30, lambda: gen.repair(out))
        return
    found = within(60, lambda: gen.repair(out))
    assert any(name in p for p in found)
    assert _snapshot(out) == _snapshot(reference)  # the link or FIFO replaced by the file
    if kind == "link-to-identical-copy":
        assert (outside / f"copy-of-{name}").read_bytes() == (reference / name).read_bytes()


def test_inputs_that_are_special_files_are_refused_unread(source, tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.npy")
    (tmp_path / "zero").symlink_to("/dev/zero")
    images = _images(np.random.default_rng(1), N)[..., 0]
    idx = bytes([0, 0, 8, 3, 0, 0, 0, N, 0, 0, 0, 9, 0, 0, 0, 8]) + images.tobytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx)
    os.mkfifo(tmp_path / "t10k-labels-idx1-ubyte")  # the labels file found beside: a FIFO
    base = ["--T", "0.01", "--cut", "3", "--per-image", "1", "--seed", "0", "--quiet"]
    cases = [
        (["--input", str(tmp_path / "pipe.npy")], "--input", "a FIFO"),
        (["--input", str(tmp_path / "zero")], "--input", "a character device"),
        (["--input", str(source), "--labels", str(tmp_path / "pipe.npy")], "--labels", "a FIFO"),
        (["--input", str(source), "--labels", str(tmp_path / "zero")], "--labels", "character"),
        (["--input", str(tmp_path / "t10k-images-idx3-ubyte")], "labels", "a FIFO"),
    ]
    for flags, flag, words in cases:
        out = tmp_path / "run"
        code = within(30, lambda f=flags, o=out: main(["generate", *f, "--out", str(o), *base]))
        err = capsys.readouterr().err
        assert code == 2 and f"{flag}: " in err and words in err and err.count("\n") == 1, err
        assert not out.exists()
    # the same source with the FIFO gone and no labels wanted works
    argv = ["generate", "--input", str(tmp_path / "t10k-images-idx3-ubyte"), "--no-labels"]
    assert main([*argv, "--out", str(tmp_path / "run"), *base]) == 0


def test_writes_never_follow_links(source, tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(outside)
    with pytest.raises(ValueError, match=r"\.lock is a symbolic link"):
        generate(source, out, **ARGS, labels=False)
    assert outside.read_text() == "keep me" and (out / ".lock").is_symlink()
    (out / ".lock").unlink()
    (out / ".tau-00000.npy.tmp").symlink_to(outside)  # a planted temporary name
    (out / ".manifest.json.tmp").symlink_to(outside)
    generate(source, out, **ARGS, labels=False)
    assert outside.read_text() == "keep me"
    assert not any(p.is_symlink() for p in out.iterdir())
    assert verify(out, full=True).ok


# -------------------------------------------------- item 2: every field of the manifest


def _walk(value, path=()):
    """Every ``(path, value)`` in a JSON document, containers before their contents."""
    yield path, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _walk(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _walk(child, (*path, i))


def _rule(path):
    """The ``WELL_TYPED`` entry whose dotted pattern matches ``path`` segment by segment
    (``*``: any list index or key), or None."""
    for pattern, rule in WELL_TYPED.items():
        parts = pattern.split(".")
        if len(parts) == len(path) and all(p in ("*", str(k)) for p, k in zip(parts, path)):
            return rule
    return None


# A well-typed edit of each field and who must refuse it. "validator": read_manifest (every
# reader, before anything is served); "check": load_generated(check=True) and verify, which
# compare with the shards and the source; "how": how the images were computed, not what
# they are (accepted, and the data served unchanged).
WELL_TYPED = {
    "format": ("diffeo-engine-generatedx", "validator"),
    "format_version": (2, "validator"),
    "ids": ("id = source_index * per_image + k, k in [0, per_image)", "validator"),
    "parameters.settings.*.T": (lambda v: v * 1.5, "check"),
    "parameters.settings.*.cut": (lambda v: v + 1, "check"),
    "parameters.per_image": (lambda v: v + 1, "validator"),
    "parameters.seed": (lambda v: v + 1, "check"),
    "parameters.noise": (0.5, "check"),
    "parameters.dtype": ("float32", "validator"),
    "parameters.shard_size": (lambda v: v + 1, "validator"),
    "parameters.interp": ("nearest", "check"),
    "parameters.resize": ([9, 8], "validator"),
    "source.spec": (lambda v: v + ".moved", "check"),
    "source.kind": ("npz", "check"),
    "source.length": (lambda v: v + 1, "validator"),
    "source.shape.*": (lambda v: v + 1, "validator"),
    "source.dtype": ("float32", "check"),
    "source.resize": ([9, 8], "validator"),
    "source.fingerprint": ("sha256:" + "ab" * 32, "check"),
    "source.labels.kind": ("idx", "check"),
    "source.labels.spec": (lambda v: v + ".moved", "check"),
    "source.labels.count": (lambda v: v + 1, "validator"),
    "source.labels.classes": (["a", "b", "c", "d"], "validator"),
    "source.labels.fingerprint": ("sha256:" + "cd" * 32, "check"),
    "versions.*": ("0.0.0", "how"),
    "execution.batch_size": (lambda v: v + 1, "how"),
    "execution.device": ("cuda", "how"),
    "execution.backend": ("torch", "how"),
    "kinds.*": ("label", "validator"),
    "image_shape.*": (lambda v: v + 1, "validator"),
    "total_images": (lambda v: v + 1, "validator"),
    "n_shards": (lambda v: v + 1, "validator"),
    "complete": (False, "validator"),
    "shards.*.index": (lambda v: v + 1, "validator"),
    "shards.*.id_start": (lambda v: v + 1, "validator"),
    "shards.*.id_stop": (lambda v: v - 1, "validator"),
    "shards.*.backend": ("triton", "how"),
    "shards.*.device": ("cuda", "how"),
    "shards.*.batch_size": (lambda v: v + 1, "how"),
    "shards.*.files.*.name": ("tau-00099.npy", "validator"),
    "shards.*.files.*.shape.*": (lambda v: v + 1, "validator"),
    "shards.*.files.*.dtype": ("float16", "validator"),
    "shards.*.files.*.bytes": (lambda v: v + 1, "validator"),
    "shards.*.files.*.sha256": ("0" * 64, "check"),
}


def _set_at(manifest: dict, path, value) -> dict:
    edited = copy.deepcopy(manifest)
    node = edited
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return edited


def _refused_by_check(out: Path) -> bool:
    def served():
        data = load_generated(out, check=True)
        return [data[i] for i in range(len(data))]

    try:
        served()
        checked = False
    except (ValueError, FileNotFoundError):
        checked = True
    try:
        verified = not verify(out, sample=4).ok
    except (ValueError, FileNotFoundError):
        verified = True
    return checked and verified


def test_every_manifest_field_is_validated_or_checked(reference, tmp_path):
    out = _copy(reference, tmp_path)
    manifest = json.loads((reference / MANIFEST).read_text())
    want = [load_generated(reference)[i] for i in range(20)]

    def write(document) -> None:
        (out / MANIFEST).write_text(json.dumps(document, indent=1) + "\n")

    unclassified, wrong = [], []
    for path, value in _walk(manifest):
        if not path:
            continue
        where = ".".join(map(str, path))
        if isinstance(value, (dict, list)):
            # a container of the wrong type, and (dicts) a key added or removed
            edits = [_set_at(manifest, path, "x")]
            if isinstance(value, dict) and path[-1] != "versions":
                extra = copy.deepcopy(value)
                extra["unexpected"] = 1
                edits.append(_set_at(manifest, path, extra))
            for edited in edits:
                write(edited)
                try:
                    read_manifest(out)
                    wrong.append(f"{where}: container edit accepted")
                except ValueError:
                    pass
            continue
        rule = _rule(path)
        if rule is None:
            unclassified.append(where)
            continue
        # a value of the wrong type: always the validator's
        write(_set_at(manifest, path, [value] if not isinstance(value, list) else {}))
        named = r"field|format_version|not a diffeo-engine generate manifest"
        with pytest.raises(ValueError, match=named):
            read_manifest(out)
        new, refused_by = rule
        new = new(value) if callable(new) else new
        write(_set_at(manifest, path, new))
        if refused_by == "validator":
            try:
                read_manifest(out)
                wrong.append(f"{where} = {new!r}: not refused by the validator")
            except ValueError as error:
                if "\n" in str(error) or not re.search(named, str(error)):
                    wrong.append(f"{where}: {error}")
        elif refused_by == "check":
            read_manifest(out)  # well-typed and consistent: only the data can tell
            if not _refused_by_check(out):
                wrong.append(f"{where} = {new!r}: served by check=True or passed verify")
        else:
            data = load_generated(out, check=True)
            same = all(
                torch.equal(data[i]["tau"], want[i]["tau"]) and data[i]["id"] == want[i]["id"]
                for i in range(20)
            )
            if not same or not verify(out, sample=4).ok:
                wrong.append(f"{where} = {new!r}: a how-field edit changed what is served")
    for path in (("parameters", "seed"), ("shards", 2, "files", "label")):
        write(_set_at(manifest, path[:-1], {
            k: v for k, v in _walk_get(manifest, path[:-1]).items() if k != path[-1]
        }))  # fmt: skip
        with pytest.raises(ValueError, match="is missing|one entry per kind"):
            read_manifest(out)
    assert not unclassified, f"classify these fields in WELL_TYPED: {sorted(set(unclassified))}"
    assert not wrong, "\n".join(wrong)


def _walk_get(document, path):
    for key in path:
        document = document[key]
    return document


# --------------------------------------------------------- item 3: refused runs


def _float_source(tmp_path: Path) -> Path:
    images = _images(np.random.default_rng(5), N).astype(np.float32)
    # pixels in [3.2e38, 3.3e38]: with a sigma of 3e37, image 1 overflows and no other
    images[1] = np.float32(3.2e38) + images[1] * np.float32(1e37 / 255)
    path = tmp_path / "f.npy"
    np.save(path, images)
    return path


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


# (what goes wrong, the error, refused before the manifest exists, the corrected call)
REFUSALS = {
    "absurd T": (dict(T=[0.01, 1e30]), "T: 1e.30 gives a typical displacement", True,
                 dict(T=[0.01, 0.02])),
    "cut too large": (dict(cut=[3, 70]), "cut: expected an integer <= 64", True, dict(cut=3)),
    "noise float16 cannot hold": (dict(noise=1e5, dtype="float16"), "noise: ", True,
                                  dict(noise=2.0, dtype="float16")),
    "noise overflows float32": (dict(noise=3e38, dtype="float32"), "dtype: the outputs", True,
                                dict(noise=3e3, dtype="float32")),
    "backend absent": pytest.param(
        dict(backend="triton", no_interpreter=True), "backend: 'triton' needs CUDA", True,
        dict(backend="auto"), marks=pytest.mark.skipif(not NO_CUDA, reason="triton runs here"),
    ),
    "device absent": pytest.param(
        dict(device="cuda"), "device: CUDA", True, dict(device="cpu"),
        marks=pytest.mark.skipif(not NO_CUDA, reason="CUDA is here"),
    ),
    "labels short": (dict(labels="short"), "labels: .* 4 labels", True, dict(labels=False)),
    # after the manifest, before the first shard is listed: removed again
    "overflow in image 1": (dict(noise=3e37, dtype="float32", float_source=True),
                            r"dtype: outputs of ids 0\.\.5 overflow", False,
                            dict(noise=0.5, dtype="float32", float_source=True)),
    "interrupt": (dict(interrupt=True), None, False, {}),
    "disk full": (dict(disk_full=True), "No space left", False, {}),
}  # fmt: skip


@pytest.mark.parametrize("existed", [False, True])
@pytest.mark.parametrize(("change", "words", "before_manifest", "corrected"),
                         list(REFUSALS.values()), ids=list(REFUSALS))  # fmt: skip
def test_a_refused_run_leaves_the_folder_as_it_found_it(
    source, tmp_path, monkeypatch, change, words, before_manifest, corrected, existed
):
    """Then the corrected call works: no "holds a run with different parameters"."""
    out = tmp_path / "run"
    if existed:
        out.mkdir()
    floats = _float_source(tmp_path)
    np.save(tmp_path / "short.npy", np.arange(N - 1))

    def call(change):
        change = dict(change)
        src = floats if change.pop("float_source", False) else source
        if change.get("labels") == "short":
            change["labels"] = tmp_path / "short.npy"
        if change.pop("no_interpreter", False):  # the tests run Triton's CPU interpreter
            monkeypatch.setattr(ops, "_interpreter_enabled", lambda: False)
        if change.pop("interrupt", False):
            monkeypatch.setattr(gen.run, "_perturb", _interrupt)
        if change.pop("disk_full", False):
            real = gen.files._write_all

            def full(fd, data, path):
                if path.name.startswith("tau-"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real(fd, data, path)

            monkeypatch.setattr(gen.files, "_write_all", full)
        return generate(src, out, **{**ARGS, "labels": False, **change}, progress=False)

    written = []
    real_write = gen.run._write_manifest
    monkeypatch.setattr(gen.run, "_write_manifest", lambda *a: (written.append(1), real_write(*a)))
    with pytest.raises((ValueError, OSError, KeyboardInterrupt), match=words):
        call(change)
    assert written == ([] if before_manifest else [1])
    assert out.exists() == existed and (not existed or not list(out.iterdir()))
    monkeypatch.undo()
    assert call(corrected)["complete"]
    assert verify(out, sample=4).ok


def test_a_refused_cli_run_then_the_corrected_one(source, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["generate", "--input", str(source), "--out", str(out), "--cut", "3"]
    base += ["--per-image", "1", "--seed", "0", "--quiet"]
    assert main([*base, "--T", "0.01", "1e30"]) == 2
    assert "--T: " in capsys.readouterr().err and not out.exists()
    assert main([*base, "--T", "0.01", "0.02"]) == 0  # no "holds a run with different ..."


# -------------------------------------------------------------- every path flag


def _path_cases(tmp_path: Path, reference: Path, source: Path) -> list:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file.txt").write_text("keep")
    (tmp_path / "folder").mkdir()
    (tmp_path / "tofile").symlink_to(tmp_path / "file.txt")
    fifo, missing = str(tmp_path / "fifo"), str(tmp_path / "missing")
    gen_args = ["--T", "0.01", "--cut", "3", "--per-image", "1", "--seed", "0", "--quiet"]
    new = str(tmp_path / "new")
    generate_ = ["generate", "--input", str(source), "--out", new, *gen_args]

    def with_flag(argv, flag, value):
        argv = list(argv)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        return argv

    cases = []
    for value, words in (("", "expected a path"), (missing, "no such file"), (fifo, "FIFO"),
                         ("cifar10:" + missing, "no such file")):  # fmt: skip
        cases.append((with_flag(generate_, "--input", value), "--input", words))
    for value, words in (("", "expected a path"), (missing, "no such file"), (fifo, "FIFO"),
                         (str(tmp_path / "folder"), "folder")):  # fmt: skip
        cases.append((with_flag(generate_, "--labels", value), "--labels", words))
    cases.append(([*generate_, "--labels", str(source), "--no-labels"], "--labels", "either"))
    for value, words in (("", "expected a path"), (str(tmp_path / "file.txt"), "not a folder"),
                         (str(tmp_path / "tofile"), "not a folder")):  # fmt: skip
        cases.append((with_flag(generate_, "--out", value), "--out", words))
    verify_ = ["verify", str(reference)]
    for value, words in (("", "expected a path"), (missing, "no such folder"),
                         (str(tmp_path / "file.txt"), "not a folder"), (fifo, "not a folder"),
                         (str(tmp_path / "folder"), "no manifest.json")):  # fmt: skip
        cases.append((["verify", value], "DIR", words))
    for flag in ("--input", "--labels"):
        cases.append(([*verify_, flag, fifo], flag, "FIFO"))
        cases.append(([*verify_, flag, ""], flag, "expected a path"))
    export_ = ["export", str(reference), "--format", "cifar-c", "--out", new]
    for value, words in (("", "expected a path"), (missing, "no such folder"),
                         (fifo, "not a folder")):  # fmt: skip
        cases.append((["export", value, *export_[2:]], "DIR", words))
    for value, words in (("", "expected a path"), (str(tmp_path / "file.txt"), "not a folder"),
                         (str(tmp_path / "folder"), "never overwrites"),
                         (str(tmp_path / "tofile"), "not a folder"),
                         (str(tmp_path / "missing" / "x"), "")):  # fmt: skip
        cases.append((with_flag(export_, "--out", value), "--out", words))
    return cases


def test_every_path_flag_is_checked_first(source, reference, tmp_path, capsys, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # --out '' must not mean "here"
    cases = _path_cases(tmp_path, reference, source)
    before = sorted(p.name for p in tmp_path.iterdir())
    ref_before = _snapshot(reference)
    for argv, flag, words in cases:
        code = within(30, lambda a=argv: main(a))
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert f"error: {flag}: " in err and words in err and err.count("\n") == 1, (argv, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, argv
        assert not list(work.iterdir()), argv
    assert _snapshot(reference) == ref_before
    # the Python API refuses the empty path too
    for call in (
        lambda: generate(source, "", **ARGS),
        lambda: verify(""),
        lambda: load_generated(""),
        lambda: export("", tmp_path / "e", format="cifar-c"),
        lambda: export(reference, "", format="cifar-c"),
        lambda: gen.repair(""),
    ):
        with pytest.raises(ValueError, match=r"(out|dest): expected a folder path, got ''"):
            call()
    assert not list(work.iterdir())
