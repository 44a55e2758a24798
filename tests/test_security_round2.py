"""Every path is hostile, round 2 (issue 22), in the library: the cache, decompression,
metadata sizes, crafted pickles, JSON depth, outputs that are inputs, links and FIFOs.

Each test here failed before its fix (the issue's item number is in its section title).
The command-line side (signals, ``python -m``, exit codes) is in
test_security_round2_cli.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flatcli.checkpoints import load_checkpoint, save_checkpoint
from flatcli.correlate import CorrelateConfig, measure_checkpoints, read_cache_entry
from flatcli.data import load_data
from flatcli.errors import FlatcliError, FlatcliWarning, UsageError
from flatcli.io import atomic_write_text

from .test_security import KW, finetuned, save_tiny, tiny_mlp, write_npz  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "sample_models" / "digits_mlp.safetensors"
DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in json.loads before the fix
CONFIG = CorrelateConfig(measures=("weight_norm",))


def correlate(ck: Path, cache: Path):  # noqa: ANN201
    return measure_checkpoints([ck], CONFIG, cache_dir=cache)


@pytest.fixture
def cached(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A checkpoint, its cache entry after one run, and the row it holds."""
    write_npz(tmp_path / "d.npz")
    ck = save_tiny(tmp_path / "m.safetensors", data="d.npz")
    row = correlate(ck, tmp_path / "cache").rows[0]
    [entry] = (tmp_path / "cache").glob("*.json")
    return ck, entry, row


def remeasured(ck: Path, entry: Path, row: dict, match: str) -> None:
    """The next run warns ``match``, measures again, and leaves a valid regular entry."""
    with pytest.warns(FlatcliWarning, match=match):
        run = correlate(ck, entry.parent)
    assert run.computed == 1 and run.rows[0] == row
    assert stat.S_ISREG(entry.lstat().st_mode)
    assert json.loads(entry.read_text())["n_train"] == row["n_train"]


def run_isolated(code: str, *, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter with 4 GiB of address space and a timeout, for
    what a crafted file did before its fix (loop forever, or take all the memory).

    Returns:
        Its stdout, the last line of its stderr, or ``"timed out"``.
    """
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            preexec_fn=limit,
        )
    except subprocess.TimeoutExpired:
        return "timed out"
    return done.stdout.strip() or (done.stderr.strip().splitlines() or ["?"])[-1]


def load_isolated(path: Path, *, timeout: float = 60, **kwargs: str) -> str:
    """``load_checkpoint(path, **kwargs)`` through :func:`run_isolated`: ``"error: …"``
    for a one-line error, ``"loaded"``, or what went wrong instead."""
    return run_isolated(
        "from flatcli.checkpoints import load_checkpoint\n"
        "from flatcli.errors import FlatcliError\n"
        f"try:\n    load_checkpoint({str(path)!r}, **{kwargs!r})\n    print('loaded')\n"
        "except FlatcliError as e:\n    print('error:', e)\n",
        timeout=timeout,
    )


# --------------------------------------------------------------------------- 1, 6, 10: cache


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_a_planted_link_in_the_cache_is_replaced_not_followed(cached, dangling: bool) -> None:
    ck, entry, row = cached
    victim = entry.parent.parent / "victim.txt"
    if not dangling:
        victim.write_text("precious")
    entry.unlink()
    entry.symlink_to(victim)
    remeasured(ck, entry, row, "a symbolic link")
    assert victim.read_text() == "precious" if not dangling else not victim.exists()


def test_a_fifo_cache_entry_is_never_opened(cached) -> None:
    ck, entry, row = cached
    entry.unlink()
    os.mkfifo(entry)
    done: list[object] = []

    def run() -> None:
        with pytest.warns(FlatcliWarning, match="a FIFO"):
            done.append(correlate(ck, entry.parent))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # before the fix: blocked writing into the FIFO; release it
        with contextlib.suppress(OSError):
            fd = os.open(entry, os.O_RDONLY | os.O_NONBLOCK)
            worker.join(timeout=10)
            os.close(fd)
        pytest.fail("correlate hung on a FIFO cache entry")
    assert done and done[0].computed == 1 and done[0].rows[0] == row
    assert stat.S_ISREG(entry.lstat().st_mode)


@pytest.mark.parametrize(
    "kind,device,reason",
    [
        (stat.S_IFCHR, (1, 3), "a character device"),  # a second /dev/null
        (stat.S_IFBLK, (240, 0), "a block device"),  # major 240: no driver uses it
    ],
    ids=["character", "block"],
)
def test_a_device_cache_entry_is_replaced_never_opened(
    cached,  # noqa: ANN001
    kind: int,
    device: tuple[int, int],
    reason: str,
) -> None:
    ck, entry, row = cached
    entry.unlink()
    try:
        os.mknod(entry, kind | 0o600, os.makedev(*device))
    except OSError as e:
        pytest.skip(f"cannot create a device here: {e.strerror}")
    remeasured(ck, entry, row, reason)


def test_a_directory_cache_entry_does_not_abort(cached) -> None:
    ck, entry, row = cached
    entry.unlink()
    entry.mkdir()
    with pytest.warns(FlatcliWarning) as caught:
        run = correlate(ck, entry.parent)
    text = [str(w.message) for w in caught]
    assert any("a directory" in t for t in text) and any("is not cached" in t for t in text)
    assert run.computed == 1 and run.rows[0] == row and entry.is_dir()


def test_a_deeply_nested_cache_entry_does_not_abort(cached) -> None:
    ck, entry, row = cached
    entry.write_text(DEEP)
    remeasured(ck, entry, row, "nested 100000 levels deep")


def test_a_huge_sparse_cache_entry_is_not_read(cached) -> None:
    _, entry, row = cached
    with open(entry, "wb") as f:
        f.truncate(300 << 20)  # sparse: costs no disk; reading it would cost 300 MiB
    tracemalloc.start()
    try:
        got, reason = read_cache_entry(entry, CONFIG, row["sha256"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got is None and "more than the 1.0 MiB allowed" in reason
    assert peak < 8 << 20, f"read {peak / 2**20:.0f} MiB of it"


@pytest.mark.parametrize(
    "forge,reason",
    [
        (lambda r: r.update(weight_norm=float("nan")), "non-finite weight_norm"),
        (lambda r: r.update(weight_norm=float("inf")), "non-finite weight_norm"),
        (lambda r: r.update(train_loss=float("-inf")), "non-finite train_loss"),
        (lambda r: r.update(test_acc=57), "test_acc outside"),
        (lambda r: r.update(train_acc=-0.5), "train_acc outside"),
        (lambda r: r.update(weight_norm_stderr=-1.0), "negative weight_norm_stderr"),
        (lambda r: r.update(test_loss=-3.0), "negative test_loss"),
    ],
    ids=["nan", "inf", "minus-inf", "acc-57", "acc-negative", "stderr-negative", "loss-negative"],
)
def test_forged_cache_values_are_measured_again(cached, forge, reason: str) -> None:  # noqa: ANN001
    ck, entry, row = cached
    forged = json.loads(entry.read_text())
    forge(forged)
    entry.write_text(json.dumps(forged))  # NaN and Infinity as Python's json writes them
    remeasured(ck, entry, row, reason)


def test_a_failed_measure_is_cached_as_null_and_served(tmp_path: Path) -> None:
    from flatcli.correlate import _measure_and_cache

    entry = tmp_path / "e.json"
    row = {"sha256": "a", "layer": "fc", "n_train": 1, "n_test": 1, "train_loss": 0.1}
    row |= {"test_loss": 0.2, "train_acc": 1.0, "test_acc": 1.0, "hparams": {}}
    row |= {"weight_norm": float("nan"), "weight_norm_stderr": None}
    import flatcli.correlate as mod

    original = mod.measure_one
    mod.measure_one = lambda *a, **k: dict(row)  # a measure that failed: NaN
    try:
        _measure_and_cache("x", entry, CONFIG, "cpu")
    finally:
        mod.measure_one = original
    served, problem = read_cache_entry(entry, CONFIG, "a")
    assert problem == "" and served is not None and served["weight_norm"] is None


# --------------------------------------------------------------------------- 1 + race: outputs


@pytest.mark.parametrize("when", ["after-the-check", "while-writing"])
def test_an_output_swapped_for_a_link_mid_run_replaces_the_link(tmp_path: Path, when: str) -> None:
    from flatcli.io import atomic_write, check_output

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = check_output(tmp_path / "out.json")  # checked before computing: a new file
    if when == "after-the-check":
        out.symlink_to(victim)  # planted while the result is computed

    def write(tmp: Path) -> None:
        tmp.write_text("result")
        if when == "while-writing":
            out.symlink_to(victim)

    atomic_write(out, write)
    assert victim.read_text() == "precious"
    assert not out.is_symlink() and out.read_text() == "result"


def test_a_link_to_a_device_outside_dev_is_replaced(tmp_path: Path) -> None:
    from flatcli.io import is_stream

    link = tmp_path / "out.json"
    link.symlink_to("/dev/null")  # a user's (or a planted) link: not the system's own
    assert not is_stream(link)
    atomic_write_text(link, "x")
    assert not link.is_symlink() and link.read_text() == "x"


def test_the_systems_own_links_are_streams() -> None:
    from flatcli.io import is_stream

    assert is_stream("/dev/null")
    assert is_stream("/dev/stdout") == os.path.exists("/dev/stdout")
    assert is_stream(f"/proc/self/fd/{sys.stderr.fileno()}") or not Path("/proc/self").exists()


def test_a_fifo_without_a_reader_fails_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flatcli.io

    monkeypatch.setattr(flatcli.io, "FIFO_WAIT_S", 0.2)
    fifo = tmp_path / "planted"
    os.mkfifo(fifo)
    with pytest.raises(FlatcliError, match="a FIFO that no process is reading"):
        atomic_write_text(fifo, "x")


# --------------------------------------------------------------------------- 9: outputs vs inputs


def test_check_distinct_uses_samefile(tmp_path: Path) -> None:
    from flatcli.io import check_distinct

    data = tmp_path / "train.csv"
    data.write_text("a,b\n1,2\n")
    hard = tmp_path / "hard.csv"
    os.link(data, hard)
    soft = tmp_path / "soft.csv"
    soft.symlink_to(data)
    for out in (data, hard, soft):
        with pytest.raises(UsageError, match="the --data file"):
            check_distinct([("--output", out)], [("the --data file", data)])
    with pytest.raises(UsageError, match="are the same file"):
        check_distinct([("--output", tmp_path / "r.html"), ("--report", tmp_path / "r.html")])
    check_distinct([("--output", "/dev/null"), ("--report", "/dev/null")])  # streams may repeat
    check_distinct([("--output", tmp_path / "a")], [("x", tmp_path / "b")])


@pytest.mark.parametrize("how", ["same", "link"])
def test_finetune_refuses_out_equal_to_its_input(tmp_path: Path, how: str) -> None:
    from flatcli.finetune import finetune

    write_npz(tmp_path / "d.npz")
    ck = save_tiny(tmp_path / "m.safetensors", data="d.npz")
    before = ck.read_bytes()
    out = ck
    if how == "link":
        out = tmp_path / "alias.safetensors"
        out.symlink_to(ck)
    with pytest.raises(UsageError, match="pass --overwrite-input"):
        finetune(ck, fam_lambda=0.0, epochs=1, out_path=out, device="cpu")
    assert ck.read_bytes() == before
    result = finetune(ck, fam_lambda=0.0, epochs=1, out_path=ck, device="cpu", overwrite_input=True)
    assert ck.read_bytes() != before and result.out_sha256 is not None


def test_finetune_refuses_a_log_on_its_data(tmp_path: Path) -> None:
    from flatcli.finetune import finetune

    data = tmp_path / "d.csv"
    data.write_text("a,b,c,d,y\n" + "".join(f"{i},1,2,3,{i % 3}\n" for i in range(30)))
    ck = save_tiny(tmp_path / "m.safetensors")
    before = data.read_text()
    with pytest.raises(UsageError, match="--log .* is a data file"):
        finetune(ck, str(data), target="y", fam_lambda=0.0, epochs=1, log_path=data)
    assert data.read_text() == before


# --------------------------------------------------------------------------- 3: .npz bombs


def npz_bomb(path: Path, mib: int = 200, *, member: str = "x.npy", shape=None) -> Path:  # noqa: ANN001
    """A deflated ``.npz`` whose ``x`` is ``mib`` MiB of zeros (``shape``: header override)."""
    from numpy.lib import format as npy

    n = (mib << 20) // (64 * 4)
    header = {"descr": "<f4", "fortran_order": False, "shape": shape or (n, 64)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open(member, "w", force_zip64=True) as f:
            if member.endswith(".npy"):
                npy.write_array_header_1_0(f, header)
            chunk = bytes(1 << 20)
            for _ in range(mib):
                f.write(chunk)
        z.writestr("y.npy", _npy(np.zeros(n, dtype=np.int64)))
    assert path.stat().st_size < 2 << 20
    return path


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def no_np_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything is decompressed (np.load reads the arrays)."""

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("np.load was called: the archive was read before the check")

    monkeypatch.setattr(np, "load", refuse)


def test_an_npz_bomb_is_refused_before_decompressing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = npz_bomb(tmp_path / "bomb.npz")
    no_np_load(monkeypatch)
    with pytest.raises(FlatcliError, match=r"declare 2\d\d\.\d MiB .*decompression bomb"):
        load_data(str(bomb))


def test_an_npz_member_that_is_not_an_array_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = npz_bomb(tmp_path / "raw.npz", member="x")  # np.load would return its raw bytes
    no_np_load(monkeypatch)
    with pytest.raises(FlatcliError, match="member 'x' is not a .npy array"):
        load_data(str(bomb))


def test_an_npy_header_that_disagrees_with_its_size_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lie = npz_bomb(tmp_path / "lie.npz", mib=1, shape=(10**9, 64))  # 256 GB claimed
    no_np_load(monkeypatch)
    with pytest.raises(
        FlatcliError, match=r"declares .* bytes but its header says \(1000000000, 64\)"
    ):
        load_data(str(lie))


def test_an_npz_larger_than_the_memory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flatcli.measures.budget as budget

    data = write_npz(tmp_path / "d.npz", n=4000)  # ~130 KB of arrays
    monkeypatch.setattr(budget, "available_memory", lambda device="cpu": 64 << 10)
    with pytest.raises(FlatcliError, match="more than the 0.1 MiB of memory available"):
        load_data(str(data))


def test_real_npz_files_still_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = np.zeros((2000, 128), dtype=np.int64)  # padded token ids: compress ~50x
    ids[:, :8] = rng.integers(1, 30000, (2000, 8))
    path = tmp_path / "tokens.npz"
    np.savez_compressed(
        path,
        input_ids=ids,
        attention_mask=(ids > 0).astype(np.int64),
        labels=rng.integers(0, 2, 2000),
    )
    assert load_data(str(path)).x["input_ids"].shape == (2000, 128)
    assert len(load_data("digits")) > 0


# --------------------------------------------------------------------------- 4: metadata sizes


def peak_rss_mib(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; its peak RSS in MiB and its stderr."""
    script = (
        code + "\nimport resource, sys\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    return int(done.stdout.split()[-1]) / 1024, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_huge_arch_kwargs_in_metadata_allocate_nothing(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"m{suffix}"
    save_checkpoint(tiny_mlp(), path, arch="flatcli.archs:mlp", arch_kwargs=KW)
    meta = {**KW, "hidden": [20000, 20000]}  # 1.6 GB of weights if built
    if suffix == ".safetensors":
        from safetensors.torch import load_file, save_file

        save_file(
            load_file(str(path)),
            str(path),
            metadata={"flatcli.arch": "flatcli.archs:mlp", "flatcli.arch_kwargs": json.dumps(meta)},
        )
    else:
        obj = torch.load(path, weights_only=True)
        obj["flatcli"]["arch_kwargs"] = json.dumps(meta)
        torch.save(obj, path)
    code = (
        "from flatcli.checkpoints import load_checkpoint\nfrom flatcli.errors import FlatcliError\n"
        f"try:\n    load_checkpoint({str(path)!r})\nexcept FlatcliError as e:\n    print(e)\n"
    )
    baseline, _ = peak_rss_mib("import torch, flatcli.checkpoints")
    peak, err = peak_rss_mib(code)
    assert peak - baseline < 300, f"{peak - baseline:.0f} MiB more than importing ({err})"


def test_huge_arch_kwargs_fail_on_the_shapes_before_building(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m.safetensors"
    meta = {**KW, "hidden": [200000, 200000]}  # 160 GB if built
    md = {"flatcli.arch": "flatcli.archs:mlp", "flatcli.arch_kwargs": json.dumps(meta)}
    save_file(load_file(str(save_tiny(path))), str(path), metadata=md)
    got = load_isolated(path)
    assert got.startswith("error: m.safetensors does not fit the architecture: "), got
    assert "(5, 4) vs (200000, 4)" in got


def test_a_huge_input_shape_in_metadata_is_not_allocated(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "m.safetensors", input_shape=(100000, 100000))  # 40 GB
    got = run_isolated(
        "from flatcli.checkpoints import load_checkpoint\n"
        "from flatcli.inspection import sample_input\n"
        f"print(sample_input(load_checkpoint({str(path)!r})))"
    )
    assert got == "None", got


# --------------------------------------------------------------------------- 11: JSON depth


def deep_metadata(tmp_path: Path, key: str) -> Path:
    from safetensors.torch import save_file

    md = {"flatcli.arch": "flatcli.archs:mlp", "flatcli.arch_kwargs": json.dumps(KW)}
    md[f"flatcli.{key}"] = DEEP
    path = tmp_path / "m.safetensors"
    save_file(tiny_mlp().state_dict(), str(path), metadata=md)
    return path


@pytest.mark.parametrize("key", ["arch_kwargs", "input_shape", "hparams"])
def test_deeply_nested_metadata_is_a_one_line_error(tmp_path: Path, key: str) -> None:
    path = deep_metadata(tmp_path, key)
    with pytest.raises(FlatcliError, match=f"flatcli.{key} is nested 100000 levels deep"):
        ck = load_checkpoint(path)
        ck.input_shape if key == "input_shape" else ck.hparams  # noqa: B018


@pytest.mark.parametrize("name", ["config.json", "flatcli.json", "model.safetensors.index.json"])
def test_deeply_nested_hugging_face_json_is_a_one_line_error(tmp_path: Path, name: str) -> None:
    pytest.importorskip("transformers")
    from tests.test_hf import tiny_bert

    folder = tmp_path / "bert"
    tiny_bert().save_pretrained(str(folder))
    (folder / name).write_text(DEEP)
    with pytest.raises(FlatcliError, match="nested 100000 levels deep"):
        load_checkpoint(folder)


def test_deeply_nested_arch_kwargs_option_is_a_usage_error() -> None:
    from flatcli.prepare import parse_json_object

    with pytest.raises(UsageError, match="--arch-kwargs is nested 100000 levels deep"):
        parse_json_object(DEEP, "--arch-kwargs")


def test_a_deeply_nested_result_is_a_one_line_error(tmp_path: Path) -> None:
    from flatcli.html import load_result

    path = tmp_path / "r.json"
    path.write_text('{"schema": ' + DEEP + "}")
    with pytest.raises(FlatcliError, match="nested 100001 levels deep"):
        load_result(path)


def test_a_deeply_nested_hparams_cell_is_kept_as_text(tmp_path: Path) -> None:
    from flatcli.correlate import arch_kwargs_table

    table = tmp_path / "hp.csv"
    table.write_text(f"checkpoint,arch.hidden\nm.safetensors,{DEEP}\n")
    assert arch_kwargs_table(table) == {"m.safetensors": {"hidden": DEEP}}


def test_json_limits_cover_size_and_huge_numbers(tmp_path: Path) -> None:
    from flatcli.untrusted import parse_json, read_json

    with pytest.raises(FlatcliError, match="not usable JSON"):
        parse_json("1" * 5000, "x")  # Python refuses to convert ints of > 4300 digits
    big = tmp_path / "big.json"
    big.write_text("[" + "0," * 1000 + "0]")
    with pytest.raises(FlatcliError, match="more than the 0.0 MiB allowed"):
        read_json(big, "file", max_bytes=100)


# --------------------------------------------------------------------------- 12: messages


def test_a_sparse_x_is_refused_in_one_line(tmp_path: Path) -> None:
    x = torch.randn(40, 4).to_sparse()
    torch.save({"x": x, "y": torch.randint(0, 3, (40,))}, tmp_path / "d.pt")
    with pytest.raises(FlatcliError, match="'?x'? is a sparse_coo tensor; save it dense"):
        load_data(str(tmp_path / "d.pt"))


def test_inf_in_the_test_split_is_named_not_called_missing(tmp_path: Path) -> None:
    from flatcli.prepare import prepare

    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    np.savez(tmp_path / "train_only.npz", x=x, y=np.zeros(40, dtype=np.int64))
    ck = save_tiny(tmp_path / "m.safetensors")
    assert not prepare(ck, data=str(tmp_path / "train_only.npz"), device="cpu").has_split("test")
    x[3, 1] = np.inf
    data = write_npz(tmp_path / "d.npz", x_test=x)
    prep = prepare(ck, data=str(data), device="cpu")
    with pytest.raises(FlatcliError, match="x_test contains NaN or Inf"):
        prep.has_split("test")


def test_a_header_only_csv_says_it_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,y\n")
    with pytest.raises(FlatcliError, match="has no rows of data"):
        load_data(str(path), target="y")


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_report_input_that_is_not_a_file_is_named(tmp_path: Path, kind: str) -> None:
    from flatcli.html import load_result

    path = {"fifo": tmp_path / "r.json", "directory": tmp_path, "device": Path("/dev/zero")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    what = {"fifo": "a FIFO", "directory": "a directory", "device": "a character device"}[kind]
    with pytest.raises(FlatcliError, match=f"is {what}, not a regular file"):
        load_result(path)


def test_read_regular_never_opens_a_fifo(tmp_path: Path) -> None:
    from flatcli.io import read_regular

    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with pytest.raises(FlatcliError, match="a FIFO"):
        read_regular(fifo, "file", max_bytes=10)  # would block in open() if it tried


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s["model"]["fc1.weight"].fill_(float("nan")), "model weights contain NaN"),
        (lambda s: s["model"]["fc1.bias"].fill_(float("inf")), "model weights contain NaN"),
    ],
    ids=["nan-weight", "inf-bias"],
)
def test_a_resume_state_with_non_finite_weights_is_damaged(
    finetuned,  # noqa: ANN001, F811 - the fixture of test_security
    change,  # noqa: ANN001
    message: str,
) -> None:
    from flatcli.finetune import finetune

    from .test_security import _tamper

    ck, data, kwargs = finetuned
    _tamper(kwargs["out_path"].with_name("o.state.pt"), change)
    with pytest.raises(FlatcliError, match=f"is damaged: {message}"):
        finetune(ck, str(data), resume=True, **kwargs)


# --------------------------------------------------------------------------- crafted pickles


def test_a_tensor_aliasing_a_small_storage_is_refused_in_data(tmp_path: Path) -> None:
    x = torch.zeros(64).as_strided((1_000_000, 64), (0, 1))  # 256 MB when copied
    torch.save({"x": x, "y": torch.zeros(1_000_000, dtype=torch.long)}, tmp_path / "d.pt")
    assert (tmp_path / "d.pt").stat().st_size < 9 << 20
    with pytest.raises(FlatcliError, match="x claims 64,000,000 values but its storage holds 64"):
        load_data(str(tmp_path / "d.pt"))


def test_a_weight_aliasing_a_small_storage_is_refused(tmp_path: Path) -> None:
    state = tiny_mlp().state_dict()
    state["fc1.weight"] = torch.zeros(4).as_strided((5, 4), (0, 1))
    torch.save(
        {
            "state_dict": state,
            "flatcli": {"arch": "flatcli.archs:mlp", "arch_kwargs": json.dumps(KW)},
        },
        tmp_path / "m.pt",
    )
    with pytest.raises(FlatcliError, match="state_dict.fc1.weight claims 20 values"):
        load_checkpoint(tmp_path / "m.pt")


def test_a_self_referencing_wrapper_does_not_loop(tmp_path: Path) -> None:
    wrapper: dict = {"epoch": 1}
    wrapper["state_dict"] = wrapper
    torch.save(wrapper, tmp_path / "m.pt")
    got = load_isolated(tmp_path / "m.pt", arch="flatcli.archs:mlp", timeout=30)
    assert got.startswith("error: m.pt holds no state dict"), got


def test_an_exponentially_shared_metadata_value_is_refused_quickly(tmp_path: Path) -> None:
    value: list = ["x"]
    for _ in range(60):
        value = [value, value]  # 2**60 leaves as text; 60 lists in the file
    flatcli_meta = {"arch": "flatcli.archs:mlp", "arch_kwargs": json.dumps(KW), "hparams": value}
    torch.save({"state_dict": tiny_mlp().state_dict(), "flatcli": flatcli_meta}, tmp_path / "m.pt")
    got = load_isolated(tmp_path / "m.pt", timeout=60)
    assert got.startswith("error: m.pt: metadata flatcli.hparams is not a string"), got


@pytest.mark.parametrize(
    "obj,message",
    [
        ({0: torch.zeros(3), "y": torch.zeros(3)}, "keys must be names"),
        ({"x": [[0.0] * 4] * 10, "y": torch.zeros(10)}, "'x' is a list, not a tensor"),
        ({"x": torch.zeros(4, 2), "y": torch.zeros(1).as_strided((4,), (0,))}, "y claims 4"),
    ],
    ids=["int-key", "list", "zero-stride-y"],
)
def test_data_files_may_only_hold_named_tensors(tmp_path: Path, obj: dict, message: str) -> None:
    torch.save(obj, tmp_path / "d.pt")
    with pytest.raises(FlatcliError, match=message):
        load_data(str(tmp_path / "d.pt"))


# --------------------------------------------------------------------------- 13: Hugging Face


@pytest.fixture
def bert(tmp_path: Path) -> Path:
    pytest.importorskip("transformers")
    from tests.test_hf import tiny_bert

    folder = tmp_path / "bert"
    tiny_bert().save_pretrained(str(folder))
    return folder


def test_a_shard_that_links_outside_the_folder_is_refused(bert: Path) -> None:
    outside = bert.parent / "outside.safetensors"
    os.replace(bert / "model.safetensors", outside)
    (bert / "shard-1.safetensors").symlink_to(outside)
    from safetensors import safe_open

    with safe_open(str(outside), framework="pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "shard-1.safetensors")}
    (bert / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FlatcliError, match="'shard-1.safetensors' points outside the folder"):
        load_checkpoint(bert)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "flatcli.json"])
def test_a_folder_file_that_links_outside_is_never_opened(bert: Path, name: str) -> None:
    secret = bert.parent / "secret"
    secret.write_text('{"architectures": ["BertModel"]}')  # parses as anything it pretends
    (bert / name).unlink(missing_ok=True)
    (bert / name).symlink_to(secret)
    with pytest.raises(FlatcliError, match=f"'{name}' points outside the folder"):
        load_checkpoint(bert)


def test_the_hub_cache_layout_still_loads(bert: Path) -> None:
    """``snapshots/REV/*`` are links into the repository's ``blobs/``: that is allowed."""
    repo = bert.parent / "models--x--bert"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in bert.iterdir():
        blob = repo / "blobs" / f"sha-{f.name}"
        os.replace(f, blob)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    assert load_checkpoint(snapshot).format == "huggingface"
