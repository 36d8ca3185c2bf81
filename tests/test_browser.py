"""Reports in a real browser (headless Chromium through Playwright): a demo-like run report and a sweep report render
without console errors, every image loads and fits its slot, and no element is wider than the viewport, on a desktop
and a phone-sized window. Screenshots are kept under ``$HOMFLOW_ARTEFACTS`` (default ``tmp/artefacts``).

Chromium comes from the system (Debian's ``chromium`` package; ``$HOMFLOW_CHROMIUM`` names another binary). Without
it the test fails under CI (``CI`` set) with the command that installs it, and is skipped, with that reason, elsewhere.
"""

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from homflow.experiments import Figure, check
from homflow.report import write_run_report, write_sweep_report
from homflow.store import RunStore

VIEWPORTS = {"desktop": (1280, 900), "phone": (390, 844)}
ARTEFACTS = Path(os.environ.get("HOMFLOW_ARTEFACTS") or Path(__file__).resolve().parent.parent / "tmp" / "artefacts")

# Elements wider than the viewport, images that did not load or overflow their slot, and the page's scroll width.
_LAYOUT_JS = """() => {
  const vw = document.documentElement.clientWidth;
  const wide = [];
  for (const e of document.querySelectorAll('body, body *')) {
    const r = e.getBoundingClientRect();
    if (r.width > vw + 0.5 || r.right > vw + 0.5 || r.left < -0.5)
      wide.push(`${e.tagName.toLowerCase()}.${e.className}: left ${r.left.toFixed(1)} width ${r.width.toFixed(1)}`);
  }
  const images = [];
  for (const img of document.images) {
    const r = img.getBoundingClientRect(), p = img.parentElement.getBoundingClientRect();
    images.push({alt: img.alt, ok: img.complete && img.naturalWidth > 0, width: r.width, height: r.height,
                 natural: [img.naturalWidth, img.naturalHeight],
                 inside: r.left >= p.left - 0.5 && r.right <= p.right + 0.5});
  }
  return {vw, scrollWidth: document.documentElement.scrollWidth, wide, images};
}"""


def _chromium() -> str:
    for c in (os.environ.get("HOMFLOW_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if c and Path(c).is_file():
            return c
    msg = ("no Chromium for the browser test of the reports: install it (Debian: `apt-get install -y chromium`) or "
           "set HOMFLOW_CHROMIUM to a Chromium binary")
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _demo_like_run(store: RunStore):
    """A run holding what the demo's report holds: a plateau, exact zeros, decades of error, a twin axis, KKT bars
    with a residual of exactly 0, long check names, a negative value against a positive tolerance."""
    t = np.concatenate([[0.0], np.geomspace(1e-3, 1e8, 60)])
    arrays = {
        "saddle_t": t, "saddle_loss": 10 / (1 + (t / 300) ** 4) + 1e-2,
        "sparse_track": np.outer(1e-3 * (1 + np.log1p(t)), [1.0, 0.3, 0.6, 0.2]),
        "early_t": np.linspace(0, 150, 80), "early_cos": np.tanh(np.linspace(0.5, 4, 80)),
        "early_norm_ratio": np.exp(np.linspace(0, 4.6, 80)), "early_ncf_ratio": np.exp(np.linspace(0, 4.6, 80)),
        "late_t": t, "late_loss": 20 / (1 + t), "late_norm": 1e-3 + np.log1p(t),
        "late_margin_ts": t, "late_margin_normalized": 0.007 - 1 / (1e3 + t), "late_margin_smoothed":
            0.0065 - 1 / (1e3 + t), "late_margin_stationarity": 1 / np.log(np.e + t),
        "late_margin_slackness": 1e-2 / np.log(np.e + t),
        "late_kkt_index": np.arange(3.0), "late_kkt_residuals": np.array([0.165, 0.0, 0.0109]),
        "split_t": t, "split_error": np.where(t < 1, 0.0, 1e-9 * np.log1p(t)),
    }
    figs = [
        Figure("saddle", "escape and the first saddle (square loss)", "saddle_t", ("saddle_loss",), ("loss",),
               xlabel="t", logx=True, logy=True, hlines=(100.0, 1000.0), display="saddle"),
        Figure("sparsity", "norms of the neurons that vanish at u* (until the saddle)", "saddle_t", ("sparse_track",),
               ("neuron group",), xlabel="t", ylabel="norm", logy=True, logx=True, display="errors"),
        Figure("alignment", "early alignment with the NCF KKT point u*", "early_t", ("early_cos",),
               ("cos(theta(t), u*)",), xlabel="t", display="alignment"),
        Figure("early_norm", "||theta(t)|| / delta: flow vs NCF-flow prediction", "early_t",
               ("early_norm_ratio", "early_ncf_ratio"), ("gradient flow", "NCF flow (rescaled time)"), xlabel="t"),
        Figure("late_loss_norm", "late phase: loss and norm", "late_t", ("late_loss", "late_norm"),
               ("loss", "||theta||"), xlabel="t", logx=True, logy=True, display="loss_norm"),
        Figure("late_margins", "late phase: margins", "late_margin_ts",
               ("late_margin_normalized", "late_margin_smoothed"), ("normalized margin", "smoothed margin"),
               xlabel="t", logx=True, display="margins"),
        Figure("late_eps_delta", "late phase: (eps, delta)-KKT along the flow", "late_margin_ts",
               ("late_margin_stationarity", "late_margin_slackness"), ("stationarity", "slackness"), xlabel="t",
               logx=True, display="errors"),
        Figure("late_kkt", "late phase: (eps, delta)-KKT residuals of the final direction", "late_kkt_index",
               ("late_kkt_residuals",), ("stationarity", "feasibility", "slackness"), display="kkt"),
        Figure("split", "wide flow vs the split narrow flow", "split_t", ("split_error",), ("relative error",),
               xlabel="t", logx=True, logy=True, display="errors", hlines=(1e-6,)),
    ]
    checks = [check("NCF KKT point u* certified (relative residual)", 3e-12, 1e-8),
              check("first saddle: smallest Hessian eigenvalue < 0", -0.0344, 0.0),
              check("sparsity: neurons zero at u* stay small until the saddle (max norm / delta)", 2.99, 10.0),
              check("early alignment: cos(theta(t_escape), u*)", 0.9988, 0.99, ">="),
              check("late phase: smoothed margin <= normalized margin (max excess)", -3.439e-4, 1e-10),
              check("split network: ||eta(t) - T theta(t)|| / ||T theta(t)|| (max over t)", 1.954e-8, 1e-6)]
    run = store.create("demo", name="demo")
    run.write_text("config.toml", 'experiment = "demo"\nname = "demo"\nlate_t1 = 100000000.0\n')
    run.save_arrays(arrays)
    run.write_json("checks.json", [c.to_dict() for c in checks])
    run.write_json("summary.json", {"summary": {"t_escape": 135.78, "skipped": [], "late_reason":
                                                "reached t1 = 1e+08 in 2 segments"},
                                    "figures": [dataclasses.asdict(f) for f in figs], "duration_s": 1.0})
    run.write_json("provenance.json", {"homflow": "0.1.0", "command": "homflow demo --quick"})
    store.finish(run.id, status="completed", checks=[c.to_dict() for c in checks], duration_s=1.0)
    return write_run_report(run)


def _sweep(store: RunStore):
    grid = {"init.scale": [1e-3, 1e-2, 1e-1], "init.seed": [0, 1]}
    for scale in grid["init.scale"]:
        for seed in grid["init.seed"]:
            run = store.create("flow", name=f"s{scale:g}-{seed}", sweep="sweep-test")
            run.write_text("config.toml", f'experiment = "flow"\n[init]\nscale = {scale!r}\nseed = {seed}\n')
            t = np.geomspace(1e-2, 1e2, 20)
            run.save_arrays({"t": t, "loss": scale * np.exp(-t)})
            c = [check("balance drift", scale**2 * (1 + seed), 1e-3).to_dict()]
            run.write_json("checks.json", c)
            run.write_json("summary.json", {"summary": {}, "figures": [dataclasses.asdict(
                Figure("loss", "loss", "t", ("loss",)))]})
            store.finish(run.id, status="completed", checks=c, duration_s=0.5)
            write_run_report(run)
    return write_sweep_report(store, "sweep-test", grid)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    store = RunStore(tmp_path_factory.mktemp("browser") / "store")
    return {"demo": _demo_like_run(store), "sweep": _sweep(store)}


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.mark.slow
@pytest.mark.parametrize("viewport", list(VIEWPORTS))
@pytest.mark.parametrize("which", ["demo", "sweep"])
def test_report_renders_cleanly_in_chromium(browser, pages, which, viewport):
    w, h = VIEWPORTS[viewport]
    page = browser.new_page(viewport={"width": w, "height": h})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(pages[which].resolve().as_uri())
    page.wait_for_load_state("load")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / f"report-{which}-{viewport}.png"), full_page=True)
    lay = page.evaluate(_LAYOUT_JS)
    if which == "sweep":  # every link to a run's report resolves
        for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
            assert href.startswith("file://") and Path(href[len("file://"):].replace("%20", " ")).is_file(), href
    page.close()
    assert not problems, problems
    assert lay["scrollWidth"] <= lay["vw"], lay["wide"][:10]
    assert not lay["wide"], lay["wide"][:10]
    n_figs = {"demo": 9, "sweep": 1}[which]
    assert len(lay["images"]) == n_figs
    for img in lay["images"]:
        assert img["ok"], f"broken image {img['alt']!r}"
        assert img["inside"], f"image {img['alt']!r} overflows its slot"
        assert img["width"] <= lay["vw"] and img["height"] > 0
        # shown whole, scaled to its slot: the aspect ratio is kept (nothing cropped)
        assert img["width"] / img["height"] == pytest.approx(img["natural"][0] / img["natural"][1], rel=0.02)
