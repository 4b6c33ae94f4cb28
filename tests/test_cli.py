"""The command line's shared options: `--debug` is honoured before and after every subcommand, and without it a
user error is one `error:` line with exit code 2. In-process: each command fails before any model loads."""

import pytest

from gemmatune.cli import main
from gemmatune.errors import GemmatuneError

# Per command: arguments that make it raise GemmatuneError before a model or tokenizer is loaded.
FAILING_ARGS = {
    "train": ["--set", "train.lerning_rate=1"],
    "plan": ["--set", "train.lerning_rate=1"],
    "generate": ["--adapter", "{tmp}/no-such-adapter", "--prompt", "hi"],
    "chat": ["--adapter", "{tmp}/no-such-adapter"],
    "eval": ["--limit", "0"],
    "merge": ["--out", "{tmp}/merged"],
    "export": ["{tmp}/no-such-run", "--out", "{tmp}/x.gguf"],
}


def _args(command, tmp_path):
    return [a.format(tmp=tmp_path) for a in FAILING_ARGS[command]]


@pytest.mark.parametrize("command", FAILING_ARGS)
def test_without_debug_an_error_is_one_line_and_exit_2(command, tmp_path, capsys):
    assert main([command, *_args(command, tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("command", FAILING_ARGS)
def test_debug_before_or_after_the_command_shows_the_exception(command, where, tmp_path):
    args = _args(command, tmp_path)
    argv = ["--debug", command, *args] if where == "before" else [command, *args, "--debug"]
    with pytest.raises(GemmatuneError):
        main(argv)


def test_eval_defaults_to_the_runs_test_file(two_adapters, tmp_path, monkeypatch, capsys):
    import shutil

    import gemmatune.cli
    import gemmatune.infer.evaluation
    from gemmatune.config import dump_config, load_config

    bare = two_adapters[0]  # a PEFT folder: names no test file
    assert main(["eval", "--adapter", str(bare)]) == 2
    assert "names no data.test_file" in capsys.readouterr().err
    run = shutil.copytree(bare, tmp_path / "run")
    test_file = tmp_path / "held_out.jsonl"
    (run / "config.yaml").write_text(dump_config(load_config(None, [f"data.test_file={test_file}"])))

    def evaluate(tuned, data, **kw):  # stands in for the real one: which file would be scored?
        raise GemmatuneError(f"would evaluate {data}")

    monkeypatch.setattr(gemmatune.cli, "_load", lambda args: None)
    monkeypatch.setattr(gemmatune.infer.evaluation, "evaluate", evaluate)
    assert main(["eval", "--adapter", str(run)]) == 2
    assert f"would evaluate {test_file}" in capsys.readouterr().err


def test_a_cli_childs_peak_rss_is_its_own_not_its_parents():
    """The peak RSS tests read is the child's: a parent holding 1 GiB does not raise it (wait4's figure did)."""
    from tests.cli_subprocess import run_cli_with_peak_rss

    ballast = bytearray(2**30)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # resident, not just reserved
    proc, peak = run_cli_with_peak_rss(["--help"])
    assert proc.returncode == 0 and "train" in proc.stdout
    assert 10 * 2**20 < peak < 2**30 / 2, peak
    del ballast
