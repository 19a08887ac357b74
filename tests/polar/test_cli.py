import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polar import cli

ROOT = Path(__file__).resolve().parents[2]


def test_env_reports_versions(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "megatron-core" in out and "engine._C" in out


def test_env_reports_the_installed_megatron_core_release(capsys):
    """megatron.core.__version__ appends `git rev-parse HEAD` run in its own install directory: for
    a venv inside a project's work tree (install.sh's .venv) that is the project's commit, so
    `polar env` named a megatron-core build (0.19.2+<this repository's commit>) that does not exist."""
    from importlib.metadata import version

    assert cli.main(["env"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("megatron-core"))
    assert row.split()[1] == version("megatron-core"), row


def test_env_prints_no_known_benign_warnings(tmp_path):
    """megatron warns at import that TE and Apex are missing (the torch fallbacks are this engine's
    path on CPU); engine/quiet.py lists such warnings, and the tools print none of them."""
    proc = subprocess.run([sys.executable, "-m", "polar.cli", "env"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "megatron-core" in proc.stdout, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]


def test_pretrain_passes_settings_to_the_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "polar.cli", "pretrain", "--nproc", "1", "--print-config", "train.lr=0.5"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lr: 0.5" in proc.stdout


def test_print_config_runs_one_process_and_shows_a_config_still_lacking_a_required_setting(tmp_path):
    """`polar finetune --print-config` (default --nproc 2) started torchrun's two processes to print a
    config, and without finetune.train ended in a config error inside torchrun's failure report."""
    proc = subprocess.run([sys.executable, "-m", "polar.cli", "finetune", "--print-config", "train.lr=0.25"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lr: 0.25" in proc.stdout and "train: ''" in proc.stdout
    assert "torch.distributed.run" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("setting, needle", [
    ("parallel.tp=3", "world size 2 is not divisible"),
    # found by reading the data and asking the machine, which the runs themselves do after torchrun starts
    ("data.seq_length=64", "data.seq_length=64"),
    ("train.kernels=cuda", "train.kernels=cuda needs a CUDA GPU"),
])
def test_a_bad_setting_stops_before_torchrun_with_its_one_message(tmp_path, setting, needle):
    """The launcher checks the settings for --nproc processes in one process first: exit 2 and the
    one `config error:` line, not torchrun's failure report (exit 1) around a worker's."""
    proc = subprocess.run([sys.executable, "-m", "polar.cli", "pretrain", "--nproc", "2", setting],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("config error:") == 1 and needle in proc.stderr, proc.stderr[-2000:]
    assert "torch.distributed.run" not in proc.stdout and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_the_defaults_pass_the_check_and_asked_for_it_is_all_that_runs(tmp_path, capsys, monkeypatch):
    """The control of the refusals above, once for all of them (it does not depend on the bad setting):
    the defaults pass the same check for 2 processes, so each refusal is its setting's (the check itself
    in this process: it starts no process group)."""
    from engine.pretrain import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    code = main(["--check-config", f"run_dir={tmp_path / 'r'}"])
    ok = capsys.readouterr()
    assert code == 0 and not (tmp_path / "r").exists(), ok.err[-2000:]
    assert "config ok: the settings, kernels and data pass the start-up checks for 2 process(es)" in ok.out
    monkeypatch.delenv("WORLD_SIZE")
    # asked through the launcher, the check is all that runs (torchrun ran it again in every process)
    asked = subprocess.run([sys.executable, "-m", "polar.cli", "pretrain", "--nproc", "2", "--check-config",
                            f"run_dir={tmp_path / 'r'}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert asked.returncode == 0 and asked.stdout.count("config ok:") == 1, asked.stdout[-2000:] + asked.stderr[-2000:]
    assert "torch.distributed.run" not in asked.stdout and not (tmp_path / "r").exists()


def test_a_restart_under_polar_says_the_resume_its_start_up_check_never_saw(tmp_path):
    """polar's run left out every start-up line, taking its start-up check (run once, before torchrun's
    first start) for having printed them: a worker lost after a checkpoint and restarted by torchrun
    (PET_MAX_RESTARTS sets its --max-restarts) resumed under checkpoint.resume=false without the note
    saying why. The worker is killed once step 1 is saved; the stop file ends the restarted run."""
    import psutil

    stop = tmp_path / "stop"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "polar.cli", "pretrain", "--nproc", "1", f"run_dir={tmp_path / 'r'}",
         "synthetic.train_triplets=64", "synthetic.eval_triplets=16", "synthetic.prompts=50", "train.steps=1000",
         "train.global_batch=2", "checkpoint.save_interval=1", "train.eval_interval=0", "checkpoint.resume=false",
         f"train.stop_file={stop}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**env, "OMP_NUM_THREADS": "1", "PET_MAX_RESTARTS": "1"})
    try:
        while not (tmp_path / "r" / "checkpoints" / "step_00000001").is_dir() and proc.poll() is None:
            # a real wait: psutil.wait_procs([]) returned at once, a busy loop taking a core from the run
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
        worker = [c for c in psutil.Process(proc.pid).children(recursive=True)
                  if "polar.torchrun" not in c.cmdline() and "engine.pretrain" in c.cmdline()]  # not the launcher
        assert len(worker) == 1, worker
        worker[0].kill()
        stop.touch()  # read by the restarted run, after its first step
        out = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    note = "note: checkpoint.resume=false holds for the run's first start; this is a restart of the same job " \
           "(TORCHELASTIC_RESTART_COUNT=1; "
    assert out.count(note) == 1 and out.index("+ ") < out.index(note) < out.index("resumed from "), out[-3000:]


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_one_process_is_checked_before_torchrun_too(tmp_path, command):
    """With --nproc 1 the launcher went straight to torchrun, whose one worker's config error came
    back inside its failure report, exit 1, where the README promises exit 2 and the one line."""
    proc = subprocess.run([sys.executable, "-m", "polar.cli", command, "--nproc", "1", "train.lr=-1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.count("config error:") == 1 and "train.lr=-1" in proc.stderr, proc.stderr[-2000:]
    assert "torch.distributed.run" not in proc.stdout and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("argv, usage", [
    (["sample", "--help"], "usage: polar sample"),
    (["data", "build", "--help"], "usage: polar data build"),
    (["data", "stats", "--help"], "usage: polar data stats"),
    (["data", "scan", "--help"], "usage: polar data scan"),
    (["format", "--help"], "usage: polar format"),
    (["hparams", "--help"], "usage: polar hparams"),
    (["plan", "--help"], "usage: polar plan"),
    (["score", "--help"], "usage: polar score"),
    (["eval", "--help"], "usage: polar eval"),
    (["serve", "--help"], "usage: polar serve"),
    (["convert", "hf-to-engine", "--help"], "usage: polar convert hf-to-engine"),
    (["convert", "engine-to-hf", "--help"], "usage: polar convert engine-to-hf"),
])
def test_tool_subcommands_reach_their_own_parsers(capsys, argv, usage):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(usage)


def test_data_without_a_tool_lists_the_tools(capsys):
    assert cli.main(["data"]) == 2
    err = capsys.readouterr().err
    assert "polar data build" in err and "polar data stats" in err
    assert err.endswith("polar data: no command given\n")


@pytest.mark.parametrize("argv, line", [
    (["smaple"], "polar: no command 'smaple' (did you mean 'sample'?); the commands: pretrain, finetune, env, convert"),
    (["data", "biuld", "x.jsonl"],
     "polar data: no command 'biuld' (did you mean 'build'?); the commands: build, scan, stats, synthetic"),
    (["convert", "hf2engine"], "polar convert: no command 'hf2engine' (did you mean 'hf-to-engine'?)"),
    # the usage alone, without the word that was wrong
    (["data", "--json"], "polar data: unknown option '--json'; a command first: polar data COMMAND --help"),
])
def test_a_mistyped_command_is_named_with_the_nearest_one(capsys, argv, line):
    # argparse listed only pretrain, finetune and env; `polar data biuld` did not say which word was wrong
    assert cli.main(argv) == 2
    assert line in capsys.readouterr().err


def test_a_tool_groups_help_is_its_tools_on_stdout(capsys):
    assert cli.main(["data", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: polar data {build,scan,stats,synthetic}")
    assert "polar data stats" in out and "polar plan" not in out


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_a_process_count_below_one_is_refused_by_name(capsys, command, nproc):
    # torchrun met --nproc_per_node=0 with a bare AssertionError traceback
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--nproc", nproc, "train.steps=1"])
    assert e.value.code == 2
    assert f"--nproc: must be a positive integer, got {nproc}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["data", "synthetic"], ["data", "build"], ["data", "scan"], ["data", "stats"],
                                  ["eval"], ["format"], ["hparams"], ["plan"], ["sample"], ["convert", "hf-to-engine"],
                                  ["score"], ["serve"]])
def test_every_option_of_a_tool_says_what_it_does(monkeypatch, argv):
    """`--help` listed --train-policies, --held-out-policies, --prompts (data synthetic), --packing
    (data build), --max-length, --tp, --pp, --precision (eval) with no word on what they do."""
    import argparse

    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(SystemExit):
        cli.main(argv)
    bare = [a.option_strings[-1] for a in seen[0]._actions if a.option_strings and not a.help]
    assert not bare, f"polar {' '.join(argv)}: options without a help text: {bare}"


def test_the_response_truncation_has_the_clients_name_in_every_tool():
    """`polar score`, `eval` and `format` say --max-response-length (the client's max_response_length);
    `polar serve` and `polar data build` said only --max-response."""
    from polar import data_build
    from polar.serve import server

    assert data_build.parse_args(["in.jsonl", "-o", "ds", "--max-response-length", "7"]).max_response == 7
    assert server.parse_args(["--checkpoint", "c", "--max-response-length", "7"]).max_response == 7
    assert server.parse_args(["--checkpoint", "c", "--max-response", "9"]).max_response == 9


@pytest.mark.parametrize("argv, line", [
    ([], "polar: no command given"),
    (["-x"], "polar: unknown option '-x' (polar --help lists the commands and options)"),
    # a command's option before the command was `unknown option '--nproc'`, which pretrain has
    (["--nproc", "2", "pretrain", "--config", "x"], "polar: --nproc goes after the command: polar pretrain --nproc 2 "
                                                    "--config x\n"),
    (["--nproc=2", "eval", "--input", "a b"], "polar: --nproc goes after the command: polar eval --nproc=2 --input "
                                              "'a b'\n"),
    (["--tp", "2", "score", "--input", "in"], "polar: --tp goes after the command: polar score --tp 2 --input in\n"),
    (["--seq-length", "8", "data", "build", "in"], "polar: --seq-length goes after the command: polar data build "
                                                   "--seq-length 8 in\n"),
    # an option the command does not take either: it was told to run `polar pretrain --bogus` (refused there) and
    # `polar data build --tp 2 in` (data build has no --tp)
    (["--bogus", "pretrain"], "polar: unknown option '--bogus': polar pretrain takes none such; polar pretrain --help "
                              "lists its options\n"),
    (["--confg=x", "finetune"], "polar: unknown option '--confg': polar finetune takes none such (did you mean "
                                "'--config'?)"),
    (["--tp", "2", "data", "build", "in"], "polar: unknown option '--tp': polar data build takes none such; "),
    (["--tpp", "2", "serve"], "(did you mean '--tp'?); polar serve --help lists its options\n"),
    # what argparse takes after the command: a long option's unambiguous beginning, a short one's value attached
    # (both were 'takes none such'); polar.launch's --nproc (score, eval) only as typed
    (["--conf", "x", "pretrain"], "polar: --conf goes after the command: polar pretrain --conf x\n"),
    (["--npr", "2", "finetune"], "polar: --npr goes after the command: polar finetune --npr 2\n"),
    (["-ods", "data", "build", "in"], "polar: -ods goes after the command: polar data build -ods in\n"),
    (["--npr", "2", "score"], "polar: unknown option '--npr': polar score takes none such (did you mean '--nproc'?)"),
    # a group's command misspelt: it was told to run `polar data --tp 2 biuld` (and engine.data was imported)
    (["--tp", "2", "data", "biuld"], "polar data: no command 'biuld' (did you mean 'build'?); the commands: "),
    (["--tp", "2", "convert"], "polar convert: no command given\n"),
    (["--nproc", "2"], "polar: --nproc goes after the command: polar COMMAND --nproc 2 (the commands that take it: "
                       "pretrain, finetune, score, eval)"),
    # a command that takes no --nproc: it was `polar env --nproc 2`, which env refuses
    (["--nproc", "2", "env"], "polar: unknown option '--nproc': polar env takes none (the commands that take it: "
                              "pretrain, finetune, score, eval)"),
    (["--nproc", "2", "data", "build", "in"], "polar: unknown option '--nproc': polar data build takes "
                                          "none (the commands "),
])
def test_no_command_or_an_unknown_option_is_said_with_every_command(capsys, argv, line):
    """argparse said "the following arguments are required: command" to a bare `polar` and to
    `polar -x`, under a usage naming pretrain, finetune and env alone of its twelve commands."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: polar [-h] [--version] COMMAND [ARGS ...]") and line in err
    if not argv:  # the whole help: the tools too
        assert "polar data build" in err and "polar hparams" in err


def test_version_is_the_installed_release(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"polar-rm {version('polar-rm')}"
    assert cli.main(["env"]) == 0  # and the first row of what a bug report pastes
    assert capsys.readouterr().out.split("\n")[0].split() == ["polar-rm", version("polar-rm")]


def test_version_run_from_a_source_tree_never_installed_is_its_pyprojects(tmp_path):
    """No polar-rm metadata (`python -m polar.cli` in a checkout, nothing installed): --version said
    `polar-rm installed`. The site-packages here less polar's own (its metadata, its editable finder)."""
    import sysconfig
    import tomllib

    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if not entry.name.startswith(("polar", "engine", "__editable__")) and entry.suffix != ".pth":
            (tmp_path / entry.name).symlink_to(entry)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-S", "-m", "polar.cli", "--version"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    release = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert proc.stdout.strip() == f"polar-rm {release} (not installed: the source tree {ROOT.resolve()})"


def test_a_subcommands_bad_argument_shows_its_own_usage(capsys):
    with pytest.raises(SystemExit) as e:  # it showed `usage: polar [-h] {pretrain,finetune,env} ...`
        cli.main(["env", "extra"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("usage: polar env [-h]\npolar env: error: unrecognized arguments: extra")


@pytest.mark.parametrize("value", ["0", "four"])
def test_a_bad_process_count_from_the_environment_is_named_by_its_variable(monkeypatch, capsys, value):
    """$POLAR_NPROC, undocumented, was checked as if typed: `argument --nproc: must be a positive
    integer, got 0` to a command without --nproc."""
    monkeypatch.setenv("POLAR_NPROC", value)
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "--check-config"])
    assert e.value.code == 2
    assert f"POLAR_NPROC={value} (the default of --nproc): must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_process_count_in_the_environment_is_no_setting(monkeypatch, value):
    """`POLAR_NPROC=` (the shell's way to clear it) was refused: 'POLAR_NPROC= (the default of --nproc):
    must be a positive integer, got ', where the other POLAR_* variables take empty as unset."""
    import argparse

    monkeypatch.setenv("POLAR_NPROC", value)
    assert cli._default_nproc(argparse.ArgumentParser()) == 2


@pytest.mark.parametrize("argv", [["pretrain"], ["finetune"], ["sample"], ["format"], ["hparams"], ["data", "stats"]])
def test_a_commands_help_says_what_it_does_with_an_example_and_its_exit_status(capsys, argv):
    """`polar pretrain --help` had no line on what it does, none had an example (format's and data
    stats' were in their docstrings only), and only format's said its exit status."""
    import re

    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert not description.startswith(("options:", "positional")), out
    assert re.search(rf"^ +polar {' '.join(argv)} \S", out, re.M), f"no example in:\n{out}"
    assert "exit status" in out, out


def test_the_help_names_the_run_directories_the_runs_default_to(capsys):
    from engine.config import EngineConfig
    from polar.finetune_recipe import FinetuneConfig

    for command, config in (("pretrain", EngineConfig), ("finetune", FinetuneConfig)):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert f"writes: run_dir (default {config().run_dir}):" in out, out
        # every file a run writes there by default: metrics.jsonl (log.metrics_file) was left out
        assert "config.yaml, summary.json, metrics.jsonl, TensorBoard logs and checkpoints/" in out, out


def test_the_top_help_documents_exit_status_and_environment(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "exit status" in out and "POLAR_NPROC" in out and "POLAR_SHOW_ALL_WARNINGS" in out


@pytest.mark.parametrize("module", ["fastapi", "uvicorn", "prometheus_client"])
def test_serve_without_its_extra_names_the_extra_before_loading(module, tmp_path):
    """A wheel installed without [serve]: the server's HTTP stack was imported only after the model
    loaded (minutes for a 7B), then failed with a traceback. Now it is the first thing imported, and
    polar names the extra; the checkpoint is not even looked at (it does not exist here)."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from polar.cli import main; sys.exit(main(['serve', '--checkpoint', 'no_such_run']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"polar serve: needs the module {module!r}" in proc.stderr and "polar-rm[serve]" in proc.stderr


def test_serve_without_any_of_its_extra_names_the_extra(tmp_path):
    """A wheel installed without [serve] also lacks starlette (fastapi's own dependency): polar/serve
    imported it at argument parsing, for type annotations only, so `polar serve --checkpoint ...` ended in
    starlette's traceback there (found installing the wheel alone in a new venv)."""
    blocked = ("fastapi", "starlette", "uvicorn", "prometheus_client")
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r}))\n"
            "from polar.cli import main; sys.exit(main(['serve', '--checkpoint', 'no_such_run']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "polar serve: needs the module" in proc.stderr and "pip install 'polar-rm[serve]'" in proc.stderr


def test_a_module_missing_inside_an_installed_optional_package_is_not_called_a_missing_extra(tmp_path):
    """fastapi installed, one of its modules not there (a misspelt import, a release that moved it): polar
    said 'needs the module 'fastapi.responses', which is not installed: pip install 'polar-rm[serve]'',
    which installs nothing; the traceback names the import."""
    code = ("import sys; sys.modules['fastapi.responses'] = None\n"
            "from polar.cli import main; sys.exit(main(['serve', '--checkpoint', 'no_such_run']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr[-2000:]
    assert "ModuleNotFoundError: import of fastapi.responses halted" in proc.stderr, proc.stderr[-2000:]
    assert "pip install" not in proc.stderr


def test_every_optional_module_has_its_extra_in_pyproject():
    import re
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, extra in cli.OPTIONAL.items():
        names = {re.split(r"[<>=!;\[ ]", req, maxsplit=1)[0].lower().replace("-", "_") for req in extras[extra]}
        assert module in names, (module, extra, extras[extra])


_MAINS_CATCHING = '''
import argparse


def catching_exception(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps")
    try:
        parser.parse_args(argv)
    except Exception as e:
        print(f"bad arguments: {e}")
        return 2
    return 0


def catching_everything(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds")
    try:
        parser.parse_args(argv)
    except:  # noqa: E722
        return 2
    return 0
'''


def test_a_commands_options_are_read_from_a_main_that_catches_its_parse_errors(tmp_path, monkeypatch):
    """_options_of stops a command's main at its first parse with an exception of its own: an Exception, which
    a main wrapping its parse in `except Exception` swallowed, so the command's options were unknown (None)."""
    import argparse

    (tmp_path / "polar_test_mains_catching.py").write_text(_MAINS_CATCHING)
    monkeypatch.syspath_prepend(str(tmp_path))
    parse_args = argparse.ArgumentParser.parse_args
    assert cli._options_of("x", "polar_test_mains_catching:catching_exception") == {"-h", "--help", "--steps"}
    assert cli._options_of("x", "polar_test_mains_catching:catching_everything") == {"-h", "--help", "--rounds"}
    assert argparse.ArgumentParser.parse_args is parse_args
