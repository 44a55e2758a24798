"""HTML pages: self-contained, the numbers of the JSON, figures present, input escaped."""

from __future__ import annotations

import base64
import json
import math
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from flatcli.errors import FlatcliError
from flatcli.html import load_result, render_html, write_html
from flatcli.report import format_value, to_json

from .results import (
    EVIL,
    EVIL_FILE,
    Page,
    audit_result,
    correlate_result,
    finetune_result,
    measure_result,
)

URL_ATTRS = ("src", "href", "srcset", "action", "formaction", "poster", "data", "background")


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], str]]:
    """Each kind of result (round-tripped through its JSON text) and its page."""
    tmp = tmp_path_factory.mktemp("pages")
    out = {}
    for kind, result in (
        ("measure", measure_result()),
        ("audit", audit_result()),
        ("correlate", correlate_result()),
        ("finetune", finetune_result(tmp)),
    ):
        saved = json.loads(to_json(result))  # exactly what --format json writes
        out[kind] = (saved, render_html(saved))
    return out


KINDS = ["measure", "audit", "correlate", "finetune"]


@pytest.mark.parametrize("kind", KINDS)
def test_page_loads_nothing_from_outside(pages, kind: str) -> None:
    page = Page(pages[kind][1])
    for tag, attrs in page.elements:
        assert tag not in ("link", "iframe", "object", "embed", "base", "form"), tag
        for name in URL_ATTRS:
            value = attrs.get(name)
            if value is not None:
                assert value.startswith(("data:image/", "#")), f"<{tag} {name}={value[:60]!r}>"
    for attrs, _ in page.scripts:
        assert "src" not in attrs
    assert "url(" not in pages[kind][1].split("</style>")[0], "CSS must not load anything"
    policy = "Content-Security-Policy"
    csp = [a["content"] for _, a in page.elements if a.get("http-equiv") == policy]
    assert csp and "default-src 'none'" in csp[0] and "img-src data:" in csp[0]


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_strings_are_shown_as_text(pages, kind: str) -> None:
    text = pages[kind][1]
    page = Page(text)
    # Two scripts only: the embedded result (not executable JSON) and the table sorter.
    assert [a.get("type") for a, _ in page.scripts] == ["application/json", None]
    assert "<script>alert" not in text and 'src="http://example.invalid' not in text
    assert EVIL in "".join(page.text) + json.dumps(load_embedded(text))
    assert not any(a.get("src", "").startswith("http") for _, a in page.elements)


def load_embedded(text: str) -> Any:
    page = Page(text)
    return json.loads(next(body for a, body in page.scripts if a.get("type") == "application/json"))


@pytest.mark.parametrize("kind", KINDS)
def test_page_embeds_its_result_and_renders_again_identically(pages, kind, tmp_path) -> None:
    saved, text = pages[kind]
    assert load_embedded(text) == saved
    (tmp_path / "page.html").write_text(text, encoding="utf-8")
    (tmp_path / "result.json").write_text(to_json(saved), encoding="utf-8")
    again = load_result(tmp_path / "page.html")
    assert again == load_result(tmp_path / "result.json") == saved
    assert render_html(again) == text  # `flatcli report` and --report write the same page


@pytest.mark.parametrize("kind", KINDS)
def test_every_page_has_the_manifest_and_the_command_line(pages, kind: str) -> None:
    saved, text = pages[kind]
    page = Page(text)
    assert any(t == "details" and a.get("id") == "manifest" for t, a in page.elements)
    shown = " ".join(page.text)
    for key, value in saved["manifest"].items():
        if key != "argv":
            assert key in shown and str(value) in shown, key
    argv = saved["manifest"].get("argv")
    if argv:
        pre = [t for t in page.text if t.startswith("flatcli ")]
        assert pre and pre[0].startswith(" ".join(argv[:2])), pre
    else:
        assert "not recorded" in shown


def test_measure_page_shows_the_json_numbers(pages) -> None:
    saved, text = pages["measure"]
    page = Page(text)
    assert page.headers["measures"] == ["measure", "value", "± stderr", "method", "flags"]
    assert len(page.tables["measures"]) == len(saved["measures"])
    for name, est in saved["measures"].items():
        (name_attrs, shown_name), value, stderr, method, flags = page.row("measures", name)
        assert shown_name == name
        if est["value"] is None:
            assert value[1] == "n/a" and "no finite value" in flags[1]
        else:
            assert float(value[0]["data-value"]) == est["value"]
            assert value[1] == format_value(est["value"])
        if est.get("hit_sigma_max"):
            assert stderr[1] == "bound hit"
        elif est["stderr"] is None:
            assert stderr[1] == "exact"
        else:
            assert float(stderr[0]["data-value"]) == est["stderr"]
            assert stderr[1] == format_value(est["stderr"])
        assert method[1].startswith(est["method"].split(" <")[0][:20])
    assert "σ′ hit the search bound" in page.row("measures", "pacbayes_flatness")[4][1]
    assert "stderr is 21% of the value" in page.row("measures", "pacbayes_flatness")[4][1]
    assert "probably degenerate" in page.row("measures", "tiny")[4][1]
    assert page.row("measures", "relative_flatness")[4][1] == "none"
    sums = page.tables["checksums"]
    assert [(c[0][1], c[2][1]) for c in sums] == [(EVIL_FILE, "ab" * 32)]


def test_audit_page_shows_the_invariance_table(pages) -> None:
    saved, text = pages["audit"]
    page = Page(text)
    assert page.headers["invariance"] == [
        "measure", "original", "layerwise: relative change", "layerwise: invariant"
    ]
    rows = saved["reparameterizations"][0]["rows"]
    for row in rows:
        name, original, change, invariant = page.row("invariance", row["measure"])
        assert float(original[0]["data-value"]) == row["original"]
        assert float(change[0]["data-value"]) == row["relative_change"]
        assert change[1] == f"{row['relative_change']:.1e}"
        assert invariant[1] == ("yes" if row["invariant"] else "no")
    assert "Refused: tanh is not positively homogeneous" in " ".join(page.text)
    assert "dead" not in " ".join(page.text)  # no dead units, no note


def test_audit_page_explains_a_moved_normalized_measure() -> None:
    result = json.loads(to_json(audit_result()))
    result["measures"]["relative_flatness_normalized"] = {
        "value": 2.0, "stderr": None, "method": "exact", "dead_units": 2,
        "dead_unit_handling": "unscaled",
    }
    result["reparameterizations"][0]["rows"].append(
        {"measure": "relative_flatness_normalized", "original": 2.0, "reparameterized": 2.1,
         "relative_change": 0.05, "invariant": False}
    )
    text = " ".join(Page(render_html(result)).text)
    assert "Note: 2 feature unit(s) are dead" in text and "--dead-units drop" in text


def test_correlate_page_shows_the_json_numbers(pages) -> None:
    saved, text = pages["correlate"]
    page = Page(text)
    for gap in ("gap_loss", "gap_acc"):
        table = f"correlations-{gap}"
        assert page.headers[table] == [
            "measure", "n", "Kendall τ-b", "perm. p", "Kendall τ-a", "Spearman ρ",
            "Pearson r", "Ψ", "ψ width", "ψ lr",
        ]
        rows = [r for r in saved["correlations"] if r["gap"] == gap]
        assert len(page.tables[table]) == len(rows) == 2
        shown_order = [r[0][1] for r in page.tables[table]]
        by_tau = sorted(rows, key=lambda r: -r["kendall_tau_b"])
        assert shown_order == [r["measure"] for r in by_tau]
        for r in rows:
            cells = page.row(table, r["measure"])
            assert int(cells[1][1]) == r["n"]
            for i, stat in zip((2, 4, 5, 6), STATS, strict=True):
                attrs, shown = cells[i]
                assert float(attrs["data-value"]) == r[stat]
                assert shown == f"{r[stat]:+.3f} [{r[stat + '_lo']:+.3f}, {r[stat + '_hi']:+.3f}]"
            assert float(cells[3][0]["data-value"]) == r["kendall_perm_p"]
            g = saved["granulated_kendall"][gap][r["measure"]]
            assert float(cells[7][0]["data-value"]) == g["Psi"]
            for j, hp in enumerate(("hp_width", "hp_lr"), start=8):
                psi = g["psi"][hp]
                assert cells[j][1] == ("n/a" if psi is None else f"{psi:+.3f}")
    table = page.tables["checkpoints"]
    assert len(table) == len(saved["checkpoints"])
    headers = page.headers["checkpoints"]
    assert "relative_flatness_stderr" not in headers  # all null: left out
    col = headers.index("relative_flatness")
    for shown, record in zip(table, saved["checkpoints"], strict=True):
        assert shown[0][1] == record["checkpoint"]
        assert float(shown[col][0]["data-value"]) == record["relative_flatness"]
        assert shown[headers.index("width (hp)")][1] == str(record["hp_width"])
    skipped = " ".join(page.text)
    assert "Skipped files (1)" in skipped and f"cannot load: {EVIL}" in skipped
    sums = page.tables["checksums"]
    assert [c[2][1] for c in sums] == [r["sha256"] for r in saved["checkpoints"]]


STATS = ("kendall_tau_b", "kendall_tau_a", "spearman_rho", "pearson_r")


def test_correlate_page_of_few_checkpoints_warns_and_says_why_a_gap_is_na() -> None:
    """The issue's four MiniLM folders: a warning, no [+1, +1] interval for τ-b (a
    degenerate bootstrap), the constant accuracy gap's reason, Ψ over the settings only."""
    from .results import small_correlate_result

    saved = json.loads(to_json(small_correlate_result()))
    page = Page(render_html(saved))
    text = " ".join(" ".join(page.text).split())
    assert "only 4 checkpoints (fewer than 10)" in text
    assert "n/a: gap_acc is 0 in all 4 checkpoints (every train_acc is 1 and every" in text
    cells = page.row("correlations-gap_loss", "relative_flatness")
    assert cells[2][1] == "+1.000 no CI" and cells[3][1] == "0.083"
    assert page.headers["correlations-gap_loss"][-2:] == ["ψ fam_lambda", "ψ clip_grad_norm"]


def test_finetune_page_shows_curves_and_before_after(pages) -> None:
    saved, text = pages["finetune"]
    page = Page(text)
    assert page.headers["before-after"] == [
        "measure", "before", "after", "change", "T-matched", "change vs T-matched", "method"
    ]
    for name, after in saved["after"].items():
        _, before, shown_after, change, matched, vs_matched, _ = page.row("before-after", name)
        b = saved["before"][name]["value"]
        t = saved["temperature_matched"][name]["value"]
        assert float(before[0]["data-value"]) == b
        assert float(shown_after[0]["data-value"]) == after["value"]
        assert change[1] == f"{after['value'] / b - 1:+.1%}"
        assert float(matched[0]["data-value"]) == t
        assert vs_matched[1] == f"{after['value'] / t - 1:+.1%}"
    text = " ".join(page.text)
    assert "logits scaled by 1.7" in text and "λ = 0.0123 (auto)" in text
    assert f"κ rose above twice its start {EVIL}" in text  # the run's warnings, escaped
    assert [int(r[0][1]) for r in page.tables["epochs"]] == [1, 2, 3]
    col = page.headers["epochs"].index
    for shown, row in zip(page.tables["epochs"], saved["history"], strict=True):
        assert float(shown[col("train loss")][0]["data-value"]) == row["full_train_loss"]
        assert float(shown[col("κ")][0]["data-value"]) == row["full_kappa"]
        assert float(shown[col("batch loss")][0]["data-value"]) == row["train_loss"]
        assert float(shown[col("batch κ")][0]["data-value"]) == row["kappa"]
        assert float(shown[col("‖W‖²")][0]["data-value"]) == row["weight_sq_norm"]
    assert "epochs 1–1 were restored" in " ".join(page.text)
    images = figures(page)
    assert len(images) == 1 and images[0][0] == "svg"
    ET.fromstring(images[0][1])


def figures(page: Page) -> list[tuple[str, bytes, str]]:
    """Each inline image: format, decoded bytes, alt text."""
    out = []
    for tag, attrs in page.elements:
        if tag == "img":
            head, data = attrs["src"].split(",", 1)
            fmt = "svg" if head.startswith("data:image/svg+xml;base64") else "png"
            out.append((fmt, base64.b64decode(data), attrs.get("alt") or ""))
    return out


def test_correlate_figures_are_inline_svgs_with_alt_text(pages) -> None:
    saved, text = pages["correlate"]
    images = figures(Page(text))
    assert [f for f, _, _ in images] == ["svg"] * 4  # per gap: τ bars and the scatter grid
    for _, data, alt in images:
        root = ET.fromstring(data)
        assert root.tag.endswith("svg") and len(data) > 10_000
        assert len(alt) > 40
    bar_alt = images[0][2]
    rows = [r for r in saved["correlations"] if r["gap"] == "gap_loss"]
    tau = {r["measure"]: r["kendall_tau_b"] for r in rows}
    for measure, value in tau.items():
        assert f"{measure}: {value:+.3f}" in bar_alt
    assert "colored by width" in images[1][2]  # the first varied hyperparameter


def test_correlate_color_by_is_checked() -> None:
    result = json.loads(to_json(correlate_result()))
    assert "colored by lr" in render_html(result, color_by="lr")
    with pytest.raises(FlatcliError, match="--color-by 'depth' is not a column"):
        render_html(result, color_by="depth")


def test_figure_bytes_are_the_written_svg(tmp_path: Path) -> None:
    import pandas as pd

    from flatcli.plots import figure_bytes, tau_bar_chart, tau_bar_figure

    stats = pd.DataFrame(correlate_result()["correlations"])
    written = tau_bar_chart(stats, "gap_loss", path_stem=tmp_path / "tau")
    assert written[1].read_bytes() == figure_bytes(tau_bar_figure(stats, "gap_loss"))


def test_write_html_is_atomic_and_checks_the_directory(tmp_path: Path) -> None:
    result = json.loads(to_json(measure_result()))
    target = tmp_path / "page.html"
    target.write_text("old", encoding="utf-8")
    assert write_html(target, result) == target
    assert target.read_text(encoding="utf-8").startswith("<!doctype html>")
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]  # no temporary file left
    with pytest.raises(FlatcliError, match="does not exist"):
        write_html(tmp_path / "missing" / "page.html", result)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "does not hold a flatcli result"),
        ('{"schema": "other/1"}', "has schema 'other/1'"),
        ("<html><body>hello</body></html>", "without an embedded flatcli result"),
    ],
    ids=["missing", "not-json", "not-object", "unknown-schema", "foreign-html"],
)
def test_load_result_rejects_bad_files(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "result.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(FlatcliError, match=message):
        load_result(path)


def test_incomplete_result_is_a_clear_error() -> None:
    with pytest.raises(FlatcliError, match="measure result is incomplete"):
        render_html({"schema": "flatcli.measure/1", "checkpoint": {}})


def test_a_bounded_search_is_a_bound_hit_not_exact(capsys: pytest.CaptureFixture[str]) -> None:
    """σ' at the top of its range: its stderr (∞, null in JSON) reads "bound hit" in the
    page as in the terminal, never "exact"."""
    from flatcli.cli.render import measures_table
    from flatcli.measures.estimate import Estimate
    from flatcli.report import measure_report

    from .results import run_manifest

    details = {"hit_sigma_max": True, "bracket": [1.99, 2.0], "sigma": 1.995}
    bounded = Estimate(0.2512, math.inf, "1/σ'², bisection", details)
    measures = {"pacbayes_flatness": bounded, "weight_norm": Estimate(74.8, None, "exact")}
    report = measure_report(
        checkpoint={"path": "m.safetensors", "sha256": "ab" * 32},
        layer={"name": "fc"},
        data={"source": "digits", "split": "train", "n_samples": 100},
        measures=measures,
        manifest=run_manifest(),
        config={},
    )
    saved = json.loads(to_json(report))
    assert saved["measures"]["pacbayes_flatness"]["stderr"] is None
    page = Page(render_html(saved))
    assert page.row("measures", "pacbayes_flatness")[2][1] == "bound hit"
    assert page.row("measures", "weight_norm")[2][1] == "exact"
    measures_table(measures)
    rows = {ln.split("│")[1].strip(): ln for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("│")}
    assert "bound hit" in rows["pacbayes_flatness"] and "exact" in rows["weight_norm"]


def test_non_finite_numbers_show_as_na() -> None:
    result = json.loads(to_json(measure_result()))
    page = Page(render_html(result))
    value = page.row("measures", "fisher_rao")[1]
    assert value[1] == "n/a" and value[0]["data-value"] == ""
    assert not math.isnan(float(page.row("measures", "tiny")[1][0]["data-value"]))


# --------------------------------------------------------------------------- the CLI

ROOT = Path(__file__).resolve().parents[1]
MLP = str(ROOT / "sample_models" / "digits_mlp.safetensors")


def invoke(*args: str) -> str:
    from typer.testing import CliRunner

    from flatcli.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_measure_report_is_the_page_of_its_json(tmp_path: Path) -> None:
    page, saved = tmp_path / "m.html", tmp_path / "m.json"
    args = ["measure", MLP, "--measures", "relative_flatness,weight_norm", "--max-samples",
            "200", "--format", "json", "--output", str(saved), "--report", str(page)]
    invoke(*args)
    result = load_result(saved)
    assert result["manifest"]["argv"] == ["flatcli", *args]  # in the order given here
    invoke("report", str(saved), "-o", str(tmp_path / "again.html"))
    assert (tmp_path / "again.html").read_bytes() == page.read_bytes()
    shown = Page(page.read_text(encoding="utf-8"))
    assert shlex.join(["flatcli", *args]) in shown.text  # the command line, as one line
    for name, est in result["measures"].items():
        assert float(shown.row("measures", name)[1][0]["data-value"]) == est["value"]


def test_audit_writes_its_page(tmp_path: Path) -> None:
    audit_page = tmp_path / "audit.html"
    invoke("audit", MLP, "--measures", "relative_flatness,weight_norm", "--max-samples", "100",
           "--report", str(audit_page))
    audit = load_result(audit_page)
    assert audit["audit"]["tolerance"] == 1e-6
    assert "(1e-06)" in audit_page.read_text(encoding="utf-8")


def test_finetune_writes_its_page(tmp_path: Path) -> None:
    ft_page = tmp_path / "ft.html"
    invoke("finetune", MLP, "--epochs", "1", "--max-samples", "64", "--out",
           str(tmp_path / "ft.safetensors"), "--report", str(ft_page))
    ft = load_result(ft_page)
    assert ft["schema"] == "flatcli.finetune/1" and len(ft["history"]) == 1
    assert ft["manifest"]["argv"][:3] == ["flatcli", "finetune", MLP]
    assert ft["checkpoint"]["output_sha256"] and "relative_flatness" in ft["after"]
    assert len(figures(Page(ft_page.read_text(encoding="utf-8")))) == 1


def test_plot_writes_the_correlate_page(tmp_path: Path) -> None:
    import pandas as pd

    table = tmp_path / "zoo.csv"
    pd.DataFrame(correlate_result()["checkpoints"]).to_csv(table, index=False)
    page = tmp_path / "zoo.html"
    invoke("plot", str(table), "--plots", str(tmp_path / "figs"), "--bootstrap", "20",
           "--color-by", "lr", "--report", str(page))
    saved = load_result(page)
    assert saved["source"] == str(table) and len(saved["checkpoints"]) == 12
    text = page.read_text(encoding="utf-8")
    assert "colored by lr" in text and len(figures(Page(text))) == 4


def test_report_fails_fast_on_a_missing_directory(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flatcli.cli import app

    missing = tmp_path / "nope" / "page.html"
    result = CliRunner().invoke(app, ["measure", MLP, "--report", str(missing)])
    assert result.exit_code == 1 and "does not exist" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["report", str(tmp_path / "none.json")])
    assert result.exit_code == 1 and "result file not found" in result.output


def test_in_memory_result_and_its_json_give_the_same_page() -> None:
    result = measure_result()
    # A NaN, as a command's in-memory result can hold (its JSON has null).
    result["measures"]["extra"] = {"value": float("nan"), "stderr": None, "method": "x"}
    assert render_html(result) == render_html(json.loads(to_json(result)))
