"""Every path is hostile, round 2 (issue 22), on the command line: signals with worker
processes and torchrun ranks, ``python -m flatcli`` in a hostile directory, outputs that
are inputs, sidecars of streams, a link planted mid-run, and hostile names in HTML pages.

Each test here failed before its fix, except the HTML pages (no hole was found there).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from .test_security_cli import FAST, MLP, ZOO, invoke, runner

__all__ = ["runner"]  # the fixture of test_security_cli

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_NORM = ("--measures", "weight_norm", *FAST)
DEEP = "[" * 100_000 + "]" * 100_000


def write_csv_data(path: Path, n: int = 80) -> Path:
    rng = np.random.default_rng(0)
    cols = [f"p{i}" for i in range(64)]
    rows = [",".join([*map(str, rng.integers(0, 16, 64)), str(i % 10)]) for i in range(n)]
    path.write_text(",".join([*cols, "y"]) + "\n" + "\n".join(rows) + "\n")
    return path


def char_device(path: Path) -> Path:
    """A second ``/dev/null`` (1, 3) at ``path``, where a test may write into it."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError as e:  # not root, or a nodev file system
        pytest.skip(f"cannot create a character device here: {e.strerror}")
    return path


# --------------------------------------------------------------------------- 9: outputs vs inputs


def test_measure_refuses_an_output_that_is_its_data(runner: CliRunner, tmp_path: Path) -> None:
    data = write_csv_data(tmp_path / "train.csv")
    before = data.read_bytes()
    result = invoke(
        runner,
        "measure",
        MLP,
        "--data",
        data,
        "--target",
        "y",
        *WEIGHT_NORM,
        "--output",
        data,
        code=2,
    )
    assert "--output" in result.stderr and "the --data file" in result.stderr
    assert data.read_bytes() == before and "flatcli:" not in result.stderr  # before measuring


def test_an_output_equal_to_the_report_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    result = invoke(runner, "measure", MLP, *WEIGHT_NORM, "-o", out, "--report", out, code=2)
    assert "are the same file" in result.stderr and not out.exists()


def test_an_output_linked_to_the_checkpoint_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    ck = tmp_path / "m.safetensors"
    ck.write_bytes(MLP.read_bytes())
    alias = tmp_path / "out.json"
    alias.symlink_to(ck)
    result = invoke(runner, "audit", ck, *WEIGHT_NORM, "--format", "json", "-o", alias, code=2)
    assert "is the checkpoint" in result.stderr and ck.read_bytes() == MLP.read_bytes()


def test_finetune_refuses_a_log_on_its_data_csv(runner: CliRunner, tmp_path: Path) -> None:
    data = write_csv_data(tmp_path / "d.csv")
    before = data.read_bytes()
    args = ("--data", data, "--target", "y", "--fam-lambda", "0", "--epochs", "1")
    result = invoke(
        runner,
        "finetune",
        MLP,
        *args,
        "--out",
        tmp_path / "o.safetensors",
        "--log",
        data,
        "--device",
        "cpu",
        code=2,
    )
    assert "--log" in result.stderr and data.read_bytes() == before


@pytest.mark.parametrize("how", ["same", "link"])
def test_finetune_out_equal_to_its_input_needs_overwrite_input(
    runner: CliRunner, tmp_path: Path, how: str
) -> None:
    ck = tmp_path / "m.safetensors"
    ck.write_bytes(MLP.read_bytes())
    out = ck if how == "same" else tmp_path / "alias.safetensors"
    if how == "link":
        out.symlink_to(ck)
    args = ("finetune", ck, "--fam-lambda", "0", "--epochs", "1", *FAST, "--out", out)
    result = invoke(runner, *args, code=2)
    assert "pass --overwrite-input" in result.stderr
    assert ck.read_bytes() == MLP.read_bytes() and not list(tmp_path.glob("*.state.pt"))
    invoke(runner, *args, "--overwrite-input")
    assert ck.read_bytes() != MLP.read_bytes() or how == "link"


def test_correlate_refuses_an_output_that_is_its_hparams(runner: CliRunner, tmp_path: Path) -> None:
    hp = tmp_path / "hp.csv"
    hp.write_text("checkpoint,lr\n" + "".join(f"{p.name},0.1\n" for p in ZOO[:3]))
    cache = tmp_path / "cache"
    result = invoke(
        runner,
        "correlate",
        *ZOO[:3],
        *WEIGHT_NORM,
        "--hparams",
        hp,
        "--cache-dir",
        cache,
        "-o",
        hp,
        code=2,
    )
    assert "the --hparams table" in result.stderr and not list(cache.glob("*.json"))


def test_report_refuses_a_hard_link_to_its_result(runner: CliRunner, tmp_path: Path) -> None:
    result = tmp_path / "r.json"
    invoke(runner, "measure", MLP, *WEIGHT_NORM, "--format", "json", "-o", result)
    page = tmp_path / "page.html"
    os.link(result, page)
    before = result.read_bytes()
    out = invoke(runner, "report", result, "-o", page, code=2)
    assert "is the result" in out.stderr and result.read_bytes() == before


# --------------------------------------------------------------------------- 8: sidecars of streams


def test_a_device_output_gets_no_sidecar(runner: CliRunner, tmp_path: Path) -> None:
    null = char_device(tmp_path / "null")
    result = invoke(runner, "measure", MLP, *WEIGHT_NORM, "--format", "csv", "-o", null)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]
    assert "its sidecar null.manifest.json is not written" in result.stderr


@pytest.mark.slow
def test_correlate_to_a_device_writes_no_sidecars(runner: CliRunner, tmp_path: Path) -> None:
    null = char_device(tmp_path / "null")
    cache = tmp_path / "cache"
    invoke(
        runner,
        "correlate",
        *ZOO[:3],
        *WEIGHT_NORM,
        "--bootstrap",
        "20",
        "--cache-dir",
        cache,
        "-o",
        null,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "null"]


def test_a_fifo_output_gets_no_sidecar(runner: CliRunner, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader waits; the CSV fits the pipe
    try:
        invoke(runner, "measure", MLP, *WEIGHT_NORM, "--format", "csv", "-o", fifo)
        got = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    assert got.startswith(b"measure,value")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_finetune_to_a_device_writes_no_sidecars(runner: CliRunner, tmp_path: Path) -> None:
    null = char_device(tmp_path / "null")
    result = invoke(
        runner, "finetune", MLP, "--fam-lambda", "0", "--epochs", "1", *FAST, "--out", null
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]
    assert "is not a regular file: no state file" in result.stderr


# --------------------------------------------------------------------------- race: a link mid-run


def test_an_output_swapped_for_a_link_mid_run_leaves_the_target_alone(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flatcli.registry as registry

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.json"
    run_measures = registry.run_measures

    def plant_then_measure(*args: object, **kwargs: object):  # noqa: ANN202
        out.symlink_to(victim)  # after the output checks, before the write
        return run_measures(*args, **kwargs)

    monkeypatch.setattr(registry, "run_measures", plant_then_measure)
    invoke(runner, "measure", MLP, *WEIGHT_NORM, "--format", "json", "-o", out)
    assert victim.read_text() == "precious"
    assert not out.is_symlink() and json.loads(out.read_text())["schema"] == "flatcli.measure/1"


# --------------------------------------------------------------------------- 1: through correlate


def test_correlate_replaces_a_planted_cache_link(runner: CliRunner, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = (*ZOO[:3], *WEIGHT_NORM, "--bootstrap", "20", "--cache-dir", cache)
    invoke(runner, "correlate", *args)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    entry = sorted(cache.glob("*.json"))[0]
    entry.unlink()
    entry.symlink_to(victim)
    result = invoke(runner, "correlate", *args)
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    links = [ln for ln in warnings if "a symbolic link" in ln]
    assert len(links) == 1 and len(warnings) == 2  # the other: only 3 checkpoints
    assert victim.read_text() == "precious" and not entry.is_symlink()


# --------------------------------------------------------------------------- 11, 12: one line


def test_deep_arch_kwargs_option_is_one_line(runner: CliRunner) -> None:
    result = invoke(runner, "measure", MLP, "--arch-kwargs", DEEP, *FAST, code=2)
    assert result.stderr.startswith("error: --arch-kwargs is nested 100000 levels deep")


def test_report_on_deep_json_is_one_line(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(DEEP)
    result = invoke(runner, "report", path, code=1)
    assert "nested 100000 levels deep" in result.stderr


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_report_on_a_non_file_says_what_it_is(runner: CliRunner, tmp_path: Path, kind: str) -> None:
    path = {"fifo": tmp_path / "r.json", "directory": tmp_path, "device": Path("/dev/zero")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    result = invoke(runner, "report", path, "-o", tmp_path / "page.html", code=1)
    assert "not a regular file" in result.stderr and "not found" not in result.stderr


def test_sparse_inputs_are_one_line(runner: CliRunner, tmp_path: Path) -> None:
    import torch

    x = torch.rand(60, 64).to_sparse()
    torch.save({"x": x, "y": torch.randint(0, 10, (60,))}, tmp_path / "d.pt")
    result = invoke(runner, "measure", MLP, "--data", tmp_path / "d.pt", *FAST, code=1)
    assert "is a sparse_coo tensor; save it dense" in result.stderr


# --------------------------------------------------------------------------- HTML pages


class Scripts(HTMLParser):
    """The ``<script>`` elements of a page and every element's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.handlers: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
        self.handlers += [k for k, _ in attrs if k.startswith("on")]


HTML_NAME = (
    "a</script><script>alert(1)</script>"
    "<img src=x onerror=document.body.setAttribute('data-pwned',1)>.safetensors"
)
"""A checkpoint path that closes the page's JSON script, and a name with an event handler."""


@pytest.mark.parametrize("command", ["finetune", "audit"])
def test_html_pages_of_finetune_and_audit_escape_hostile_names(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.chdir(tmp_path)
    ck = Path(HTML_NAME)
    ck.parent.mkdir(parents=True)
    ck.write_bytes(MLP.read_bytes())
    page = Path(f"{command}.html")
    extra = {
        "finetune": ("--fam-lambda", "0", "--epochs", "1", "--out", "o.safetensors"),
        "audit": ("--measures", "weight_norm"),
    }[command]
    invoke(runner, command, ck, *extra, *FAST, "--report", page)
    text = page.read_text()
    parsed = Scripts()
    parsed.feed(text)
    assert [s.get("type") for s in parsed.scripts] == ["application/json", None]
    assert parsed.handlers == [] and "<script>alert" not in text and "<img src=x" not in text
    assert "data-pwned" in text  # the name is there, as text
    if shutil.which("chromium"):  # and a real browser draws it as text too
        from .test_html_browser import run_browser

        dom = run_browser("chromium", page.resolve(), tmp_path / "profile", "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert '<img src="x"' not in dom.stdout and 'data-pwned="1"' not in dom.stdout
        assert "&lt;img src=x" in dom.stdout


# --------------------------------------------------------------------------- 14: python -m flatcli


def python_m(args: list[str], cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    env.pop("PYTHONPATH", None)  # flatcli comes from the installed package, as for a user
    return subprocess.run(
        [sys.executable, "-m", "flatcli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def plant(folder: Path, module: str) -> Path:
    """A ``module.py`` in ``folder`` that leaves a marker file when imported."""
    marker = folder / f"{module}-ran"
    (folder / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef build(**kw):\n    raise SystemExit(9)\n"
    )
    return marker


def test_python_m_flatcli_imports_nothing_from_the_working_directory(tmp_path: Path) -> None:
    marker = plant(tmp_path, "rich")
    done = python_m(["inspect", str(MLP)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert not marker.exists() and "digits_mlp.safetensors" in done.stdout


def test_python_m_flatcli_does_not_import_metadata_modules_from_cwd(tmp_path: Path) -> None:
    from flatcli import archs
    from flatcli.checkpoints import save_checkpoint

    marker = plant(tmp_path, "evilmod")
    ck = save_checkpoint(archs.mlp(64, [8], 10), tmp_path / "m.safetensors", arch="evilmod:build")
    done = python_m(["inspect", str(ck), "--trust-code"], tmp_path)
    assert done.returncode == 1 and not marker.exists(), done.stderr
    assert "cannot import architecture module evilmod" in done.stderr


# --------------------------------------------------------------------------- 2: signals


def processes_with(mark: str) -> list[int]:
    """Live processes whose environment holds ``mark`` (this test's children, however deep)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if mark.encode() in environ and state != "Z":
            found.append(int(pid))
    return found


def wait_until_gone(mark: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := processes_with(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def correlate_cmd(cache: Path, jobs: int, n: int = 10) -> list[str]:
    """``correlate`` arguments slow enough (seconds per checkpoint) to be interrupted."""
    measure = ["--measures", "pacbayes_flatness", "--mc-samples", "30", "--device", "cpu"]
    where = ["--jobs", str(jobs), "--cache-dir", str(cache)]
    return ["correlate", *map(str, ZOO[:n]), *where, *measure]


def run_and_signal(
    cmd: list[str], sig: int, *, group: bool = False, cwd: Path | None = None, **env: str
) -> tuple[int, float, str, list[int]]:
    """Start ``cmd`` in its own session, send ``sig`` once a first cache entry exists.

    Returns:
        The exit code, the seconds it took to exit after the signal, its stderr, and the
        processes of the run (workers, ranks) still alive 10 s later.
    """
    cache, mark = Path(cmd[cmd.index("--cache-dir") + 1]), f"FLATCLI_TEST_{uuid.uuid4().hex}"
    environ = {**os.environ, "OMP_NUM_THREADS": "1", mark: "1", **env}
    environ.pop("PYTHONPATH", None)  # flatcli from the installed package, as for a user
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environ,
        start_new_session=True,
        # as from a terminal, even where this test runs with SIGINT ignored
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (sig, signal.SIGINT)],
    )
    try:
        deadline = time.monotonic() + 180
        while not any(cache.glob("*.json")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert any(cache.glob("*.json")), "no checkpoint finished within 3 minutes"
        (os.killpg if group else os.kill)(proc.pid, sig)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
        alive = wait_until_gone(mark, 10)
    finally:
        for pid in processes_with(mark):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, elapsed, err.decode(), alive


def check_cache(cache: Path) -> None:
    assert not list(cache.glob(".*.tmp")), "a half-written entry was left"
    for entry in cache.glob("*.json"):
        assert json.loads(entry.read_text())["n_train"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig,group",
    [
        (signal.SIGINT, True),  # what Ctrl-C does: the whole process group
        (signal.SIGTERM, False),
        (signal.SIGHUP, False),
        (signal.SIGTERM, True),
    ],
    ids=["Ctrl-C", "SIGTERM", "SIGHUP", "SIGTERM-to-the-group"],
)
def test_a_signal_stops_correlate_workers(tmp_path: Path, sig: int, group: bool) -> None:
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "flatcli", *correlate_cmd(cache, jobs=2)]
    code, elapsed, err, orphans = run_and_signal(cmd, sig, group=group)
    assert orphans == [], f"workers outlived the run: {orphans}"
    word = "interrupted" if sig == signal.SIGINT else f"terminated by {signal.Signals(sig).name}"
    assert code == 128 + sig and word in err and "Traceback" not in err, err
    assert elapsed < 5, f"took {elapsed:.1f} s to stop"
    assert 1 <= len(list(cache.glob("*.json"))) < 10  # finished results kept, not the rest
    check_cache(cache)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_torchrun_with_two_ranks_stops_cleanly_on_a_signal(tmp_path: Path, sig: int) -> None:
    """torchrun forwards the signal to each rank's process group; every rank and its
    ``--jobs 2`` workers must stop on their own (torchrun would SIGKILL them after 30 s),
    leave no half-written entry, and import nothing from the working directory."""
    cache = tmp_path / "cache"
    marker = plant(tmp_path, "rich")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd = [*torchrun, "--standalone", "-m", "flatcli", *correlate_cmd(cache, jobs=2)]
    env = {"PYTHONWARNINGS": "ignore", "FLATCLI_DIST_TIMEOUT": "300"}
    code, elapsed, err, orphans = run_and_signal(cmd, sig, cwd=tmp_path, **env)
    assert orphans == [], f"processes outlived torchrun: {orphans}"
    assert code != 0 and elapsed < 25, (elapsed, err[-2000:])
    word = "interrupted" if sig == signal.SIGINT else f"terminated by {signal.Signals(sig).name}"
    assert err.count(word) >= 1, err[-2000:]
    frames = [ln for ln in err.splitlines() if ln.strip().startswith("File ")]
    assert not any("/flatcli/" in ln for ln in frames), err[-3000:]  # torchrun's own: fine
    assert not marker.exists()
    check_cache(cache)
