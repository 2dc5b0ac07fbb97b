"""The report on a synthetic store with known numbers, on empty and partial stores, and in a browser."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
import shutil
import subprocess
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from qrobust.tasks.storage import report
from qrobust.tasks.storage.store import connect
from qrobust.tasks.storage.views import refresh_statistics
from tests.conftest import require_or_skip

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_PROBLEMS = 30
LAYERS = 4
MODULES = [f"model.layers.{layer}.{part}" for layer in range(LAYERS) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
EXPECTED_TITLES = [
    "overview",
    "pass@1 per cell with 95% bootstrap intervals",
    "full precision against published scores",
    "accuracy against average bits",
    "degradation against fp",
    "accuracy-memory and accuracy-latency frontiers",
    "claim: does the diffusion model degrade less than its AR partner?",
    "HAWQ per-layer bit allocation",
    "HAWQ layer sensitivity: Hessian trace per parameter",
    "HAWQ against uniform GPTQ",
    "failed cells",
    "reproducibility: prompts, stop strings and sampler settings of every cell",
]

# --------------------------------------------------------------------------- synthetic store

FAMILY = {"coda-demo": "diffusion", "qwen-demo": "ar", "tiny-ar": "ar"}
SETTINGS = [("fp", None, None, 16.0), ("rtn", 4, None, 4.0), ("gptq", 2, None, 2.0), ("gptq", 4, None, 4.0),
            ("gptq", 8, None, 8.0), ("hawq", None, 2.5, 2.47), ("hawq", None, 3.5, 3.41)]


def solved_problems(model: str, method: str, bits, benchmark: str) -> int:
    """How many of the first problems a cell solves (the rest fail).

    At gptq 2-bit the diffusion model keeps its fp accuracy and the AR model loses it all (a
    strong effect for the diffusion model); at gptq 4-bit it is the other way round.
    """
    fp = {"coda-demo": 24, "qwen-demo": 24, "tiny-ar": 3}[model]
    if method == "fp":
        return fp
    if (method, bits) == ("gptq", 2):
        return fp if model == "coda-demo" else 0
    if (method, bits) == ("gptq", 4) and benchmark == "humaneval":
        return 0 if model == "coda-demo" else fp
    return max(fp - {"rtn": 4, "gptq": 1, "hawq": 2}[method], 0)


def cell_config(model: str, method: str, bits, budget, benchmark: str, n_samples: int) -> dict:
    template = "{prompt}" if benchmark == "humaneval" else '"""\n{description}\n"""\n'
    return {
        "cell": {
            "model": {"name": model, "family": FAMILY[model], "dtype": "bfloat16", "training": None},
            "method": {"name": method, "bits": bits, "budget": budget, "group_size": 128, "sym": True},
            "generation": {"max_new_tokens": 256, "temperature": 0.0 if n_samples == 1 else 0.8,
                           "n_samples": n_samples, "seed": 0},
            "calibration": {"source": "stdlib", "n_samples": 16, "seq_len": 64},
        },
        "format": {"prompt_template": template, "stop_strings": ["\ndef ", "\nclass "]},
    }


def add_cell(con, model, method, bits, budget, avg_bits, benchmark, n_samples, status="done", error=None):
    cell_id = f"{model}-{method}-{bits}-{budget}-{benchmark}"
    config = json.dumps(cell_config(model, method, bits, budget, benchmark, n_samples))
    con.execute(
        "INSERT INTO runs (cell_id, model, family, method, bits, budget, benchmark, n_samples, config_json, status,"
        " error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [cell_id, model, FAMILY[model], method, bits, budget, benchmark, n_samples, config, status, error])
    if status != "done":
        return
    solved = solved_problems(model, method, bits, benchmark)
    # With several samples, sample 0 follows `solved` and later samples miss one more problem each,
    # so the seeds disagree and pass@k grows with k.
    samples = pd.DataFrame(
        [(f"{benchmark}/{i}", j, i < solved - j or (j > 0 and i == N_PROBLEMS - 1))
         for i in range(N_PROBLEMS) for j in range(n_samples)], columns=["task_id", "sample_idx", "passed"])
    # One bulk insert per cell: row-by-row inserts would dominate the test's run time.
    con.register("incoming_samples", samples)
    con.execute(
        "INSERT INTO samples (cell_id, model, family, method, bits, budget, benchmark, task_id, sample_idx, passed)"
        " SELECT ?, ?, ?, ?, ?, ?, ?, task_id, sample_idx, passed FROM incoming_samples",
        [cell_id, model, FAMILY[model], method, bits, budget, benchmark])
    con.unregister("incoming_samples")
    pass_at_1 = float(samples["passed"].mean())
    con.execute(
        "INSERT INTO results (cell_id, model, family, method, bits, budget, avg_bits, benchmark, n_problems,"
        " n_samples, pass_at_1, model_bytes, peak_mem_bytes, gen_tokens_per_s, gen_seconds)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [cell_id, model, FAMILY[model], method, bits, budget, avg_bits, benchmark, N_PROBLEMS, n_samples,
         pass_at_1, int(1e8 * avg_bits / 16), int(2e8), 100.0 / avg_bits, 0.2 * avg_bits * N_PROBLEMS * n_samples])
    if method == "hawq":
        con.executemany("INSERT INTO layer_bits VALUES (?, ?, ?)",
                        [(cell_id, m, 2 + 2 * ((i + int(budget)) % 2)) for i, m in enumerate(MODULES)])


def add_layer_sensitivity(con, model: str) -> None:
    rows = [(model, i // 7, m, 4096, (-1.0 if i % 5 == 0 else 1.0) * (i + 1) * (3.0 if FAMILY[model] == "ar" else 1.0),
             0.1, "hutchinson") for i, m in enumerate(MODULES)]
    con.executemany("INSERT INTO layer_sensitivity VALUES (?, ?, ?, ?, ?, ?, ?)", rows)


def build_store(path: Path) -> Path:
    with connect(path) as con:
        for model in ("coda-demo", "qwen-demo"):
            for benchmark, n_samples in (("humaneval", 1), ("mbpp", 5)):
                for method, bits, budget, avg_bits in SETTINGS:
                    add_cell(con, model, method, bits, budget, avg_bits, benchmark, n_samples)
            add_layer_sensitivity(con, model)
        add_cell(con, "tiny-ar", "fp", None, None, 16.0, "humaneval", 1)
        add_cell(con, "tiny-ar", "gptq", 4, None, 4.0, "humaneval", 1)
        add_cell(con, "tiny-ar", "gptq", 2, None, 2.0, "humaneval", 1, status="failed",
                 error="RuntimeError: <quantizer> ran out of memory | at layer 3")
        con.execute("INSERT INTO pairs VALUES ('coda-demo', 'qwen-demo')")
        # coda-demo's fp cell solves 24 of 30 (0.8): 0.78 lies in its interval, 0.5 lies far below qwen-demo's
        con.executemany("INSERT INTO published_scores VALUES (?, ?, ?, ?)", [
            ("coda-demo", "humaneval", 0.78, "coda-demo paper"), ("qwen-demo", "humaneval", 0.5, "qwen-demo card"),
            ("qwen-demo", "humaneval-plus", 0.4, "qwen-demo card")])
        refresh_statistics(con, resamples=500)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("report-store") / "results.duckdb")


@pytest.fixture(scope="module")
def sections(store) -> dict[str, report.Section]:
    with connect(store, read_only=True) as con:
        return {s.title: s for s in report.build_sections(con)}


@pytest.fixture(scope="module")
def written(store, sections, tmp_path_factory) -> Path:
    """The report files of the synthetic store (figures drawn once, shared with `sections`)."""
    out = tmp_path_factory.mktemp("report")
    report.write_report(store, out, sections=list(sections.values()))
    return out


def markdown_rows(markdown: str, *leading: str) -> list[list[str]]:
    """Table rows of `markdown` whose first cells are `leading`."""
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            for line in markdown.splitlines() if line.startswith("|")]
    return [row for row in rows if row[:len(leading)] == list(leading)]


# --------------------------------------------------------------------------- content


def test_published_scores_stand_beside_fp_cells_and_an_excluded_one_is_flagged(sections):
    markdown = sections["full precision against published scores"].markdown
    [coda] = markdown_rows(markdown, "coda-demo", "humaneval")
    [qwen] = markdown_rows(markdown, "qwen-demo", "humaneval")
    assert (coda[5], coda[7], coda[8], coda[9]) == ("0.800", "0.780", "0.020", "inside")
    assert (qwen[7], qwen[9], qwen[10]) == ("0.500", "**outside**", "qwen-demo card")
    assert not markdown_rows(markdown, "qwen-demo", "humaneval-plus")  # no fp cell ran it


def test_degradation_table_gives_each_cells_minimum_detectable_drop(store, sections):
    import numpy as np

    from qrobust.tasks.numerics.stats import minimum_detectable_drop

    markdown = sections["degradation against fp"].markdown
    [header] = markdown_rows(markdown, "model", "family")
    assert header[-1] == "MDE (80%)"
    [row] = markdown_rows(markdown, "coda-demo", "diffusion", "humaneval", "gptq 4-bit")
    solved = np.array([1] * 24 + [0] * 6)
    assert row[-1] == f"{minimum_detectable_drop(np.ones(30), solved, np.ones(30)):.3f}"


def test_every_section_title_appears_in_markdown_and_html(written, sections):
    assert list(sections) == EXPECTED_TITLES
    markdown = (written / "report.md").read_text()
    page = (written / "report.html").read_text()
    for title in EXPECTED_TITLES:
        assert f"## {title}\n" in markdown
        assert re.search(rf'<h2 id="section-\d+">{re.escape(report.html.escape(title))}</h2>', page), title


def test_claim_table_gives_the_verdicts_of_the_constructed_effects(sections):
    claim = sections["claim: does the diffusion model degrade less than its AR partner?"].markdown
    (strong,) = markdown_rows(claim, "coda-demo", "qwen-demo", "humaneval", "gptq 2-bit")
    assert strong[-1] == "supported"
    assert float(strong[7]) == pytest.approx(0.8)  # diffusion loses 0, AR loses 24 of 30 problems
    (reverse,) = markdown_rows(claim, "coda-demo", "qwen-demo", "humaneval", "gptq 4-bit")
    assert reverse[-1] == "contradicted"
    (same,) = markdown_rows(claim, "coda-demo", "qwen-demo", "humaneval", "gptq 8-bit")
    assert same[-1] == "inconclusive"
    assert "about 1 in 20" in claim and "supported" in claim.split("|")[0]


def test_pass_at_1_table_has_intervals_seed_spread_and_larger_k(sections):
    table = sections["pass@1 per cell with 95% bootstrap intervals"].markdown
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert "95% CI" in header and "seed std" in header and "pass@5" in header
    (greedy_fp,) = markdown_rows(table, "qwen-demo", "humaneval", "fp")
    assert greedy_fp[6] == "0.800" and re.fullmatch(r"\[0\.\d{3}, 0\.\d{3}\]", greedy_fp[7])
    assert greedy_fp[8] == "" and greedy_fp[9] == ""  # one sample: no seed spread, no pass@5
    (sampled_fp,) = markdown_rows(table, "qwen-demo", "mbpp", "fp")
    assert float(sampled_fp[8]) > 0  # the five seeds disagree
    assert float(sampled_fp[9].split()[0]) > float(sampled_fp[6])  # pass@5 > pass@1


def test_degradation_table_has_delta_interval_flips_and_mcnemar(sections):
    table = sections["degradation against fp"].markdown
    (row,) = markdown_rows(table, "qwen-demo", "ar", "humaneval", "gptq 2-bit")
    assert row[8] == "-0.800" and row[10:12] == ["24", "0"]
    assert float(row[12]) < 1e-6
    assert len(sections["degradation against fp"].figures) == 1


def test_figures_are_pngs_embedded_as_data_uris_with_alt_text(written):
    files = sorted(written.glob("figure-*.png"))
    assert len(files) >= 10
    assert all(f.read_bytes().startswith(PNG_SIGNATURE) for f in files)
    page = (written / "report.html").read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert len(images) == len(files) == page.count("<img ")
    assert all(base64.b64decode(data).startswith(PNG_SIGNATURE) for _, data in images)
    assert all(alt.strip() for alt, _ in images)
    assert "http://" not in page and "https://" not in page


def test_heatmaps_are_one_per_model_and_budget_across_benchmarks(sections):
    figures = sections["HAWQ per-layer bit allocation"].figures
    captions = sorted(caption for caption, _ in figures)
    assert captions == [f"bit allocation of {m} at a {b}-bit HAWQ budget"
                        for m in ("coda-demo", "qwen-demo") for b in ("2.5", "3.5")]


def test_failed_cell_is_listed_with_its_error_on_one_line(sections):
    (row,) = markdown_rows(sections["failed cells"].markdown, "tiny-ar", "humaneval", "gptq 2-bit")
    assert row[3] == "RuntimeError: <quantizer> ran out of memory \\| at layer 3"


def test_reproducibility_groups_cells_with_identical_settings(sections):
    table = sections["reproducibility: prompts, stop strings and sampler settings of every cell"].markdown
    rows = markdown_rows(table, "coda-demo", "mbpp")
    assert len(rows) == 1  # seven cells, one row
    (row,) = rows
    assert row[2] == '"\\"\\"\\"\\n{description}\\n\\"\\"\\"\\n"' and "temperature=0.8" in row[4]
    assert row[-1].count(";") == len(SETTINGS) - 1 and "gptq 2-bit (group_size=128, sym=true)" in row[-1]
    assert len(markdown_rows(table, "tiny-ar")) == 1


def test_tiny_model_note_only_when_tiny_models_are_present(sections, tmp_path):
    assert "tiny-ar" in sections["overview"].markdown.split("\n")[0]
    path = tmp_path / "results.duckdb"
    with connect(path) as con:
        add_cell(con, "qwen-demo", "fp", None, None, 16.0, "humaneval", 1)
    with connect(path, read_only=True) as con:
        assert "Demo models" not in report.overview_section(con).markdown


def test_html_is_well_formed_and_escapes_text(written):
    page = (written / "report.html").read_text()
    assert "&lt;quantizer&gt;" in page and "<quantizer>" not in page
    checker = TagBalance()
    checker.feed(page)
    assert checker.problems == [] and checker.open == []


class TagBalance(HTMLParser):
    """Records every closing tag that does not match the innermost open one."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.open, self.problems = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.problems.append(tag)


# --------------------------------------------------------------------------- empty and partial stores


def test_empty_store_writes_a_report_of_empty_sections(tmp_path):
    path = tmp_path / "results.duckdb"
    with connect(path):
        pass
    out = report.write_report(path, tmp_path / "report")
    markdown = Path(out["markdown"]).read_text()
    assert "## failed cells\n\n_none_" in markdown and "statistics not computed" in markdown
    assert "<h2" in Path(out["html"]).read_text()
    with connect(path) as con:
        refresh_statistics(con)
    markdown = Path(report.write_report(path, tmp_path / "report-2")["markdown"]).read_text()
    assert "statistics not computed" not in markdown and "_none_" in markdown


def test_partial_store_with_one_model_and_no_statistics(tmp_path):
    path = tmp_path / "results.duckdb"
    with connect(path) as con:
        add_cell(con, "qwen-demo", "fp", None, None, 16.0, "humaneval", 1)
        add_cell(con, "qwen-demo", "gptq", 4, None, 4.0, "humaneval", 1)
    with connect(path, read_only=True) as con:
        sections = {s.title: s for s in report.build_sections(con)}
    assert "HAWQ against uniform GPTQ" not in sections
    assert sections["HAWQ per-layer bit allocation"].figures == []
    assert sections["claim: does the diffusion model degrade less than its AR partner?"].markdown == \
        report.STATS_MISSING
    assert len(sections["accuracy against average bits"].figures) == 1


# --------------------------------------------------------------------------- helpers


def test_pareto_front_keeps_only_undominated_points_in_increasing_x():
    x = [1.0, 2.0, 2.0, 3.0, 4.0, 0.5]
    y = [0.5, 0.4, 0.7, 0.7, 0.9, 0.1]
    assert report.pareto_front(x, y) == [5, 0, 2, 4]


def test_module_position_reads_layer_and_kind():
    assert report.module_position("model.layers.12.mlp.down_proj") == (12, "down")
    assert report.module_position("model.layers.0.self_attn.q_proj") == (0, "q")
    assert report.module_position("lm_head") == (None, "lm_head")


def test_markdown_to_html_renders_tables_with_escaped_pipes_and_markup():
    html_text = report.markdown_to_html("Some **bold** <b>.\n\n| a | b |\n| --- | --- |\n| x \\| y | <i> |\n")
    assert "<p>Some <strong>bold</strong> &lt;b&gt;.</p>" in html_text
    assert "<td>x | y</td><td>&lt;i&gt;</td>" in html_text


# --------------------------------------------------------------------------- browser


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(written, tmp_path):
    binary = chromium_binary()
    require_or_skip(binary is not None, "chromium is not installed (apt-get install -y chromium)")
    page = render_in_chromium(binary, written / "report.html", tmp_path)
    assert page["title"] == "qrobust report"
    assert page["headings"] == len(EXPECTED_TITLES)
    assert page["images"] == len(list(written.glob("figure-*.png")))
    assert page["images_loaded"], "an image did not load"
    assert page["errors"] == []
    screenshot = tmp_path / "report.png"
    screenshot.write_bytes(page["screenshot"])
    assert_non_trivial_png(screenshot)


def assert_non_trivial_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] >= 500 and pixels.shape[1] >= 800
    assert pixels[..., :3].std() > 0.02  # not a blank page


IMAGES_CHECK = """JSON.stringify({
    title: document.title,
    headings: document.querySelectorAll('h2').length,
    images: document.images.length,
    images_loaded: Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)
})"""


def render_in_chromium(binary: str, html_path: Path, work: Path, timeout: float = 30.0) -> dict:
    """Open a page in headless Chromium over the DevTools protocol (127.0.0.1 only).

    Returns the page facts of IMAGES_CHECK, the console / exception / log errors seen while it
    loaded, and a PNG screenshot.
    """
    profile = work / "chromium-profile"
    profile.mkdir(exist_ok=True)
    # A marker left by an earlier browser on this profile would point at a dead port.
    (profile / "DevToolsActivePort").unlink(missing_ok=True)
    stderr = (work / "chromium.stderr").open("w")
    process = subprocess.Popen(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
         "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--window-size=1280,1600", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        port = devtools_port(profile, process, timeout)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as response:
            targets = json.load(response)
        target = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        return asyncio.run(asyncio.wait_for(inspect_page(target, html_path.resolve().as_uri()), timeout))
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        stderr.close()


def devtools_port(profile: Path, process: subprocess.Popen, timeout: float) -> int:
    """Chromium writes the port it chose (for --remote-debugging-port=0) to DevToolsActivePort."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode} before DevTools started")
        if marker.exists() and marker.read_text().strip():
            return int(marker.read_text().split()[0])
        time.sleep(0.1)
    raise TimeoutError(f"chromium did not open a DevTools port within {timeout:.0f}s")


async def inspect_page(websocket_url: str, page_url: str) -> dict:
    from websockets.asyncio.client import connect as ws_connect

    assert websocket_url.startswith("ws://127.0.0.1:")
    async with ws_connect(websocket_url, max_size=None) as ws:
        devtools = DevTools(ws)
        for domain in ("Page", "Runtime", "Log"):
            await devtools.call(f"{domain}.enable")
        await devtools.call("Page.navigate", url=page_url)
        await devtools.wait_for("Page.loadEventFired")
        facts = await devtools.call("Runtime.evaluate", expression=IMAGES_CHECK, returnByValue=True)
        shot = await devtools.call("Page.captureScreenshot", format="png")
        return {**json.loads(facts["result"]["value"]), "errors": devtools.errors(),
                "screenshot": base64.b64decode(shot["data"])}


class DevTools:
    """Minimal DevTools protocol client: numbered calls, events kept for later inspection."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message["result"]
            self.events.append(message)

    async def wait_for(self, event: str) -> dict:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(json.loads(await self.ws.recv()))
        return next(e for e in self.events if e.get("method") == event)

    def errors(self) -> list[str]:
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text", ""))
        return found


def test_claim_section_shows_what_each_pair_holds_equal_above_its_verdicts(tmp_path):
    from qrobust.tasks.grid_file import load_grid
    from qrobust.tasks.pairs import pair_facts
    from qrobust.tasks.storage.store import write_pair_matching

    path = build_store(tmp_path / "results.duckdb")
    facts = [dataclasses.replace(f, diffusion_model="coda-demo", ar_model="qwen-demo")
             for f in pair_facts(load_grid("pairs")) if f.diffusion_model == "llada-8b"]
    with connect(path) as con:
        write_pair_matching(con, facts)
    with connect(path, read_only=True) as con:
        claim = report.claim_section(con).markdown
    pair_line = "- **coda-demo** against **qwen-demo**: same: prompt format, max new tokens; " \
                "differ: backbone, parameters, tokenizer; evaluation settings: each as published."
    assert pair_line in claim
    (backbone,) = markdown_rows(claim, "coda-demo", "qwen-demo", "backbone")
    assert backbone[3:] == ["trained from scratch", "Llama-3-8B", "differs"]
    assert claim.index(pair_line) < claim.index("| diffusion model | AR model | benchmark |")
