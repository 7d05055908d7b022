"""The ``hlbd-fast`` command: argparse sub-commands, ``--version``, ``python -m hlbd_fast``, output paths checked first."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import hlbd_fast
from hlbd_fast import bench, cli, demo, doctor, factory


def _exit(argv, capsys):
    """Run ``cli.main(argv)``, expecting argparse to exit; return ``(code, out, err)``."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


# ---------------------------------------------------------------------------- usage, help, version
def test_no_arguments_prints_usage_to_stderr_and_exits_2(capsys):
    code, out, err = _exit([], capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: hlbd-fast ") and "the following arguments are required: COMMAND" in err


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_commands_and_exits_0(flag, capsys):
    code, out, err = _exit([flag], capsys)
    assert code == 0 and err == ""
    assert out.startswith("usage: hlbd-fast [-h] [--version] COMMAND ...")
    for command, text in cli.COMMANDS.items():
        assert f"    {command} " in out and text.split()[0] in out


def test_version(capsys):
    code, out, err = _exit(["--version"], capsys)
    assert code == 0 and err == ""
    assert out == f"hlbd-fast {hlbd_fast.__version__}\n"


def test_unknown_command_is_a_usage_error(capsys):
    code, out, err = _exit(["frobnicate"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: hlbd-fast ")
    assert "invalid choice: 'frobnicate' (choose from 'demo', 'bench', 'doctor', 'tune')" in err


@pytest.mark.parametrize("command", ["demo", "bench", "doctor"])
def test_unknown_option_is_a_usage_error(command, capsys):
    code, out, err = _exit([command, "--frobnicate"], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"usage: hlbd-fast {command} ") and "unrecognized arguments: --frobnicate" in err


def test_bad_option_value_is_a_usage_error(capsys):
    code, _, err = _exit(["demo", "--epochs", "ten"], capsys)
    assert code == 2 and "--epochs: invalid int value: 'ten'" in err


@pytest.mark.parametrize(
    "command, options",
    [
        ("demo", ("--epochs", "--baseline-epochs", "--preset", "--data", "--device", "--out", "--seed", "--no-progress")),
        ("bench", ("--rows", "--epochs", "--baseline-epochs", "--device", "--out", "--seed", "--threads", "--budget", "--order")),
        ("doctor", ("--model", "--steps", "--warmup", "--batch-size", "--preset", "--device", "--json")),
    ],
)
def test_command_help_lists_its_options(command, options, capsys):
    code, out, _ = _exit([command, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: hlbd-fast {command} ")
    for option in options:
        assert option in out
    assert "--tiny" not in out  # bench's smoke-test switch stays hidden


# ---------------------------------------------------------------------------- one parser, the modules' options
@pytest.mark.parametrize("module", [demo, bench, doctor])
def test_subcommand_parses_the_modules_options(module):
    name = module.__name__.rsplit(".", 1)[1]
    args = cli.build_parser().parse_args([name])
    assert args.command == name and args.run is module.run
    alone = argparse.ArgumentParser()
    module.add_arguments(alone)
    assert {k: v for k, v in vars(args).items() if k not in ("command", "run")} == vars(alone.parse_args([]))


def test_demo_defaults_through_the_command():
    args = cli.build_parser().parse_args(["demo", "--epochs", "3", "--no-progress"])
    assert (args.epochs, args.baseline_epochs, args.preset, args.out, args.no_progress) == (3, None, "fastest", None, True)


def test_demo_errors_pass_through(capsys):
    assert cli.main(["demo", "--preset", "turbo"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == ("hlbd-fast demo: error: --preset 'turbo' is unknown; choose one of baseline, extreme, fastest, quick")
    assert captured.out == ""


# ---------------------------------------------------------------------------- output paths before any work
@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any command starts training, benchmarking or diagnosing."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started although an output path cannot be written")

    monkeypatch.setattr(demo, "load_hlbd", refuse)
    monkeypatch.setattr(demo.FastTrainer, "from_preset", refuse)
    monkeypatch.setattr(bench, "run_bench", refuse)
    monkeypatch.setattr(bench, "reference_data", refuse)
    monkeypatch.setattr(doctor.passes, "diagnose", refuse)
    monkeypatch.setattr(factory, "reference", refuse)
    monkeypatch.setattr(factory, "load", refuse)


@pytest.mark.parametrize(
    "command, option, extra",
    [
        ("demo", "--out", ["--epochs", "1", "--baseline-epochs", "0", "--device", "cpu", "--no-progress"]),
        ("bench", "--out", ["--tiny", "--rows", "baseline", "--epochs", "1", "--device", "cpu"]),
        ("doctor", "--json", ["--steps", "1", "--device", "cpu"]),
    ],
)
@pytest.mark.parametrize("where", ["under a file", "an existing directory"])
def test_every_output_option_is_checked_first(command, option, extra, where, tmp_path, capsys, no_work):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    if where == "under a file":
        path = blocker / "results"
    elif option == "--json":
        path = tmp_path  # a directory where a file goes
    else:
        path = tmp_path / "results"  # the folder is fine; the JSON file it gets is a directory
        (path / ("bench.json" if command == "bench" else "generations.json")).mkdir(parents=True)
    assert cli.main([command, option, str(path), *extra]) == 2
    captured = capsys.readouterr()
    line = captured.err.strip()
    assert captured.out == "" and "\n" not in line
    assert line.startswith(f"hlbd-fast {command}: error: ") and option in line
    assert blocker.read_text(encoding="utf-8") == "not a folder"


# ---------------------------------------------------------------------------- python -m hlbd_fast
def _python_m(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hlbd_fast", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_python_m_version_and_usage(tmp_path):
    done = _python_m("--version", cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"hlbd-fast {hlbd_fast.__version__}\n", "")
    done = _python_m(cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.startswith("usage: hlbd-fast ")


def test_python_m_demo_refuses_a_bad_out_at_once(tmp_path):
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    done = _python_m("demo", "--out", str(tmp_path / "a-file" / "results"), "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    bad = str(tmp_path / "a-file" / "results")
    assert done.stderr.startswith(f"hlbd-fast demo: error: --out {bad!r} cannot be written (")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
