"""The run page of `gemmatune serve` in a real headless browser (Debian's chromium driven by Playwright):
no console errors, every metrics.jsonl point on the curve, a new line shows without a reload, the eval table,
and the chat box answering with the adapter's greedy text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gemmatune.cli import main
from gemmatune.infer.evaluation import EvalReport, VariantScores
from tests.conftest import require, write_jsonl
from tests.serve_process import API_KEY, ServerProcess, serve_args

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def write_run(run_dir: Path) -> list[dict]:
    """A run folder as training leaves it mid-way: metrics.jsonl (train loss every step, eval every 5), and the
    eval.json that `gemmatune eval` writes (its own writer)."""
    run_dir.mkdir(parents=True)
    rows = []
    for step in range(1, 31):
        rows.append({"step": step, "epoch": round(step / 30, 4), "loss": 3.0 / (1 + step / 10) + 0.05 * (step % 3),
                     "learning_rate": 1e-4, "tokens_per_second": 850.0 + step})
        if step % 5 == 0:
            rows.append({"step": step, "epoch": round(step / 30, 4), "eval_loss": 2.5 / (1 + step / 12)})
    write_jsonl(run_dir / "metrics.jsonl", rows)
    variants = [VariantScores("base", 2.9, 18.2, 0.0, 12.5, 40.0, 80.2, 120),
                VariantScores("support", 1.1, 3.0, 45.0, 71.3, 100.0, 9.5, 120)]
    EvalReport("test.jsonl", 20, "chat", 64, variants,
               [{"prompt": "My parcel is late", "reference": "team: shipping", "base": "I am a model",
                 "support": "team: shipping"}]).save(run_dir)
    return rows


def playwright_api():
    """Playwright's sync API, with Debian's chromium to drive; the test is skipped (or fails under
    GEMMATUNE_TEST_ALL) when either is missing."""
    require(Path(CHROMIUM).is_file(), "Debian's chromium (apt-get install chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
    require(sync_api is not None, "the playwright package (pip install -e '.[test]')")
    return sync_api


def open_page(browser, url: str, problems: list[str]):
    """The run page at `url` in a new context with the API key set; console errors and page errors go to
    `problems`."""
    context = browser.new_context(viewport={"width": 1500, "height": 900})
    context.add_init_script(f"localStorage.setItem('gemmatune-api-key', {json.dumps(API_KEY)})")
    page = context.new_page()
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url + "/")
    return page


def vertices(page, series: str) -> int:
    """Points the chart's SVG path of `series` (train, eval, smooth) passes through; 0 when it is not drawn."""
    return page.evaluate(f"""(() => {{
        const path = document.querySelector("#chart path.{series}");
        return path ? path.getAttribute("d").match(/[ML]/g).length : 0;
    }})()""")


@pytest.fixture(scope="module")
def page_server(tiny_gemma3, two_adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    rows = write_run(tmp / "runs" / "support")
    proc = ServerProcess(serve_args(tiny_gemma3, two_adapters, tmp / "runs"), tmp / "server.log")
    yield proc, tmp / "runs" / "support", rows
    proc.stop()


def test_page_curves_live_update_eval_and_chat(page_server, tiny_gemma3, two_adapters, tmp_path):
    sync_api = playwright_api()
    server, run_dir, rows = page_server
    a, b = two_adapters
    # The chat box sends the conversation greedily (temperature 0) with its max tokens: the reference is
    # `gemmatune generate --greedy` on the same message with the same adapter.
    answers = tmp_path / "answers.jsonl"
    assert main(["generate", "--base", str(tiny_gemma3), "--adapter", f"a={a}", "--adapter", f"b={b}",
                 "--precision", "fp32", "--greedy", "--max-new-tokens", "12", "--use", "b", "--input",
                 str(write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "hello"}]}])),
                 "--output", str(answers)]) == 0
    expected = json.loads(answers.read_text(encoding="utf-8"))["generation"]

    train_points = sum("loss" in r for r in rows)
    eval_points = sum("eval_loss" in r for r in rows)
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = open_page(browser, server.url, problems)
            chart = page.locator("#chart")
            sync_api.expect(chart).to_have_attribute("data-train-points", str(train_points), timeout=20_000)
            sync_api.expect(chart).to_have_attribute("data-eval-points", str(eval_points))
            drawn = page.evaluate("window.gemmatune.chart.data.map(s => s.filter(v => v != null).length)")
            assert drawn == [train_points, train_points, eval_points, train_points]  # the chart holds every point
            # ... and draws every one: a vertex per train loss, a dot per eval loss, no smoothed curve by default.
            assert vertices(page, "train") == train_points and vertices(page, "eval") == eval_points
            assert page.locator("#chart circle.eval").count() == eval_points
            assert page.evaluate("window.gemmatune.chart.smooth") is False and vertices(page, "smooth") == 0
            box = page.locator("#chart svg .overlay").bounding_box()
            page.mouse.move(box["x"] + box["width"] - 1, box["y"] + box["height"] / 2)  # the hover: last step's values
            sync_api.expect(page.locator("#chart-hover")).to_have_text("step 30")
            sync_api.expect(page.locator("#chart-legend .key.train")).to_contain_text(f"{rows[-2]['loss']:.4g}")
            sync_api.expect(page.locator("#progress")).to_contain_text("step 30 / ?")
            sync_api.expect(page.locator("#progress")).to_contain_text("880 tokens/s")
            sync_api.expect(page.locator("#eval-table")).to_contain_text("support")
            sync_api.expect(page.locator("#eval-table")).to_contain_text("71.3")
            sync_api.expect(page.locator("#eval")).to_contain_text("team: shipping")

            # A line appended while the page is open appears without a reload.
            with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": 31, "epoch": 1.0, "loss": 0.42}) + "\n")
            sync_api.expect(chart).to_have_attribute("data-train-points", str(train_points + 1), timeout=10_000)
            assert page.evaluate("window.gemmatune.chart.data[1].at(-1)") == 0.42
            assert vertices(page, "train") == train_points + 1
            sync_api.expect(page.locator("#chart-hover")).to_have_text("step 30")  # the hover outlives redraws
            page.check("#smooth")  # the EMA curve appears over the raw points, which stay
            assert page.evaluate("window.gemmatune.chart.smooth") is True
            assert vertices(page, "smooth") == train_points + 1 and vertices(page, "train") == train_points + 1
            assert page.evaluate("window.gemmatune.chart.data[1].at(-1)") == 0.42
            smooth = page.evaluate("window.gemmatune.chart.data[3]")
            assert len(smooth) == train_points + 1 and smooth[-1] != 0.42
            assert smooth[0] == pytest.approx(rows[0]["loss"])  # debiased: the first point is not pulled to 0
            page.uncheck("#smooth")
            assert vertices(page, "smooth") == 0 and vertices(page, "train") == train_points + 1

            page.select_option("#model", "b")
            page.fill("#max-tokens", "12")
            page.fill("#prompt", "hello")
            page.click("#send")
            reply = page.locator(".msg.assistant")
            sync_api.expect(reply).to_have_attribute("data-done", "1", timeout=60_000)
            assert page.evaluate("window.gemmatune.history.map(m => m.role)") == ["user", "assistant"]
            assert page.evaluate("window.gemmatune.history[1].content") == expected
            assert reply.get_attribute("data-finish") in ("stop", "length")
            page.screenshot(path=str(tmp_path / "run-page.png"), full_page=True)  # a test artifact, not in the repo
        finally:
            browser.close()
    assert problems == []


def write_method_runs(runs: Path) -> list[float]:
    """A GRPO run (rewards per step, its reward report) and a DPO run (its preference report), each report written by
    its own writer. Returns the GRPO run's rewards."""
    from gemmatune.infer.preference import PairReport, PairScores
    from gemmatune.infer.rewards import RewardReport, RewardScores

    rewards = [0.1 * step for step in range(1, 7)]
    for name in ("grpo", "dpo"):
        (runs / name).mkdir(parents=True)
    write_jsonl(runs / "grpo" / "metrics.jsonl", [{"step": step, "loss": 0.001 * step, "reward": r, "kl": 0.0}
                                                  for step, r in enumerate(rewards, 1)])
    RewardReport("test.jsonl", 8, 24, [RewardScores("base", 0.125, {"routing_format": 0.25, "right_routing": 0.0},
                                                    50.0, 20.0),
                                       RewardScores("grpo", 1.375, {"routing_format": 1.0, "right_routing": 0.375},
                                                    100.0, 9.0)]).save(runs / "grpo")
    write_jsonl(runs / "dpo" / "metrics.jsonl", [{"step": 1, "loss": 0.6931, "rewards/accuracies": 0.5}])
    PairReport("pairs.jsonl", 8, "chat", 24, [PairScores("base", 37.5, -0.25, -20.0, -19.75, 50.0, 20.0),
                                               PairScores("dpo", 87.5, 3.125, -12.0, -15.125, 100.0, 9.0)]).save(
        runs / "dpo")
    return rewards


def test_page_shows_each_method_figure(two_adapters, tiny_gemma3, tmp_path):
    """GRPO: the curve is the reward per step, the table the rewards per function; DPO: preference accuracy."""
    sync_api = playwright_api()
    rewards = write_method_runs(tmp_path / "runs")
    server = ServerProcess(serve_args(tiny_gemma3, two_adapters, tmp_path / "runs"), tmp_path / "server.log")
    problems: list[str] = []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = open_page(browser, server.url, problems)
            page.locator("#runs li[data-name=grpo]").click()
            chart = page.locator("#chart")
            sync_api.expect(chart).to_have_attribute("data-train-points", str(len(rewards)), timeout=20_000)
            assert page.evaluate("window.gemmatune.chart.data[1]") == rewards
            sync_api.expect(page.locator("#chart-legend .key.train")).to_have_text("train reward")
            sync_api.expect(page.locator("#chart svg .label.y")).to_have_text("reward")
            table = page.locator("#eval-table")
            sync_api.expect(table).to_contain_text("mean reward")
            sync_api.expect(table).to_contain_text("reward: right_routing")
            sync_api.expect(table).to_contain_text("1.375")
            sync_api.expect(table).to_contain_text("0.375")
            page.locator("#runs li[data-name=dpo]").click()
            sync_api.expect(page.locator("#chart-legend .key.train")).to_have_text("train loss", timeout=10_000)
            sync_api.expect(table).to_contain_text("preference accuracy %")
            sync_api.expect(table).to_contain_text("87.5")
            browser.close()
    finally:
        server.stop()
    assert problems == []


def test_run_summary_progress_eta_and_finish(tmp_path):
    """What the page shows of a run: step / total (config max_steps, then run.json), tokens/s, ETA, state."""
    import os
    import time

    from gemmatune.config import dump_config, load_config
    from gemmatune.runs.folder import RunRecord, TrainingRecord, metrics_rows, write_record
    from gemmatune.serve.page import run_summary

    run_dir = tmp_path / "run"
    write_run(run_dir)
    (run_dir / "config.yaml").write_text(dump_config(load_config(None, ["train.max_steps=60"])), encoding="utf-8")
    now = time.time()
    os.utime(run_dir / "config.yaml", (now - 300, now - 300))  # started 300 s ago, 30 steps done: 10 s a step
    os.utime(run_dir / "metrics.jsonl", (now, now))
    summary = run_summary(run_dir)
    assert summary["state"] == "training" and summary["step"] == 30 and summary["total"] == 60
    assert summary["tokens_per_second"] == 880.0 and summary["has_eval"]
    assert abs(summary["eta_seconds"] - 300) <= 2
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"step": 31, "loss": 1.0}\n{"step": 32, "lo')  # a line still being written
    rows, count = metrics_rows(run_dir, since=36)
    assert rows == [{"step": 31, "loss": 1.0}] and count == 37  # the partial line waits for its newline
    write_record(run_dir, RunRecord(finished="2026-12-02T00:00:00", training=TrainingRecord(global_steps=58)))
    summary = run_summary(run_dir)
    assert summary["state"] == "finished" and summary["total"] == 58 and summary["eta_seconds"] is None
    assert summary["time_budget_seconds"] is None and summary["stop_reason"] is None


def test_run_summary_shows_the_time_budget(tmp_path):
    """A budgeted run: its budget, what is left of it (its ETA: it ends on time), then why it stopped."""
    import os
    import time

    from gemmatune.config import dump_config, load_config
    from gemmatune.runs.folder import RunRecord, TrainingRecord, write_record
    from gemmatune.serve.page import run_summary

    run_dir = tmp_path / "run"
    write_run(run_dir)
    (run_dir / "config.yaml").write_text(dump_config(load_config(None, ["train.max_steps=600",
                                                                         "train.time_budget=10m"])), encoding="utf-8")
    now = time.time()
    os.utime(run_dir / "config.yaml", (now - 300, now - 300))  # 300 s of 600 spent; 30 of 600 steps: ETA 2850 s
    os.utime(run_dir / "metrics.jsonl", (now, now))
    summary = run_summary(run_dir)
    assert summary["time_budget_seconds"] == 600 and abs(summary["budget_left_seconds"] - 300) <= 2
    assert abs(summary["eta_seconds"] - 300) <= 2  # the budget, not the steps asked, ends it
    write_record(run_dir, RunRecord(finished="x", training=TrainingRecord(global_steps=40, stop_reason="time_budget")))
    summary = run_summary(run_dir)
    assert summary["stop_reason"] == "time_budget" and summary["budget_left_seconds"] is None


BAD_RUNS = {  # issue 28 case 3: each broke run_summary, so /api/runs answered 500 for every run
    "bad-step": ("metrics.jsonl", '{"step": "abc", "loss": 1.0}\n'),
    "huge-steps": ("run.json", '{"finished": "x", "training": {"global_steps": "1e999"}}'),
    "inf-steps": ("run.json", '{"training": {"global_steps": 1e999}}'),
    "deep": ("run.json", "[" * 100_000 + "]" * 100_000),
    "string-record": ("run.json", '"just a string"'),
}


def test_one_malformed_run_never_breaks_the_listing(tmp_path):
    from gemmatune.serve.page import list_summaries

    runs_dir = tmp_path / "runs"
    write_run(runs_dir / "good")
    for name, (file, text) in BAD_RUNS.items():
        (runs_dir / name).mkdir()
        (runs_dir / name / "config.yaml").write_text("{}\n")
        (runs_dir / name / file).write_text(text)
    listed = {r["name"]: r for r in list_summaries(runs_dir)}
    assert set(listed) == {"good", *BAD_RUNS}
    assert listed["good"]["state"] != "error" and listed["good"]["step"] == 30
    assert listed["bad-step"]["step"] == 0 and listed["huge-steps"]["total"] is None  # bad values ignored
    assert listed["inf-steps"]["total"] is None
    assert listed["deep"]["state"] == "error" and "nested deeper" in listed["deep"]["error"]
    assert listed["string-record"]["state"] == "error" and "not a JSON object" in listed["string-record"]["error"]


@pytest.mark.parametrize("name", ["deep", "string-record"])
def test_cli_on_a_malformed_run_folder_is_one_line(name, two_adapters, tmp_path):
    """`gemmatune merge` on such a folder ended in a traceback."""
    from tests.cli_subprocess import run_cli

    run = tmp_path / name
    shutil.copytree(two_adapters[0], run)
    file, text = BAD_RUNS[name]
    (run / file).write_text(text)
    proc = run_cli(["merge", str(run), "--out", str(tmp_path / "merged")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == \
        [line for line in proc.stderr.splitlines() if line.strip()][-1:]


def _get(server, path: str) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_page_reads_nothing_outside_runs_and_lists_bad_runs(page_server, tmp_path):
    """issue 28 cases 2 and 3 through the real server: links out of runs/ are not followed, metrics.jsonl linked
    to /dev/zero is refused at once, and a malformed run is marked while the others list."""
    server, run_dir, _ = page_server
    runs_dir = run_dir.parent
    secret = tmp_path / "secret.json"
    secret.write_text('{"password": "hunter2"}')
    outside = tmp_path / "outside-run"
    write_run(outside)
    made = [runs_dir / n for n in ("leak", "linked", "zero", "deep")]
    try:
        (runs_dir / "leak").mkdir()
        (runs_dir / "leak" / "metrics.jsonl").write_text('{"step": 1}\n')
        (runs_dir / "leak" / "eval.json").symlink_to(secret)
        (runs_dir / "linked").symlink_to(outside, target_is_directory=True)
        (runs_dir / "zero").mkdir()
        (runs_dir / "zero" / "metrics.jsonl").symlink_to("/dev/zero")
        (runs_dir / "deep").mkdir()
        (runs_dir / "deep" / "config.yaml").write_text("{}\n")
        (runs_dir / "deep" / "run.json").write_text("[" * 100_000 + "]" * 100_000)
        status, body = _get(server, "/api/runs/leak/eval")
        assert status == 422 and "hunter2" not in json.dumps(body) and "outside" in body["error"]["message"]
        for path in ("/api/runs/linked/eval", "/api/runs/linked/metrics", "/api/runs/zero/metrics"):
            status, body = _get(server, path)
            assert status == 422 and body["error"]["code"] == "run_unreadable", (path, body)
        status, body = _get(server, "/api/runs")
        assert status == 200
        listed = {r["name"]: r for r in body["runs"]}
        assert listed["support"]["state"] != "error"
        assert {n: listed[n]["state"] == "error" for n in ("leak", "linked", "zero", "deep")} == \
            {"leak": False, "linked": True, "zero": True, "deep": True}
        assert listed["leak"]["has_eval"] is False  # its eval.json leads outside: not offered
        assert str(tmp_path) not in json.dumps(body)
    finally:
        for path in made:
            if path.is_symlink():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)
