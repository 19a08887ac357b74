"""The `polar` command.

    polar pretrain [--nproc N] [--config PRESET|FILE] [section.key=value ...]   # torchrun engine.pretrain
    polar finetune [--nproc N] checkpoint.init_from=DIR finetune.train=FILE [...]    # torchrun engine.finetune
    polar convert hf-to-engine SRC DST | engine-to-hf SRC DST   # checkpoints in and out (polar/convert/)
    polar serve --checkpoint RUN [...]   # reward server for RL trainers (polar/serve/)
    polar eval ...            # ranked-data preference accuracy with references (engine/evaluate.py)
    polar score ...           # offline scoring, exact client format, any layout (engine/score.py)
    polar sample ...          # pre-training triplets from a prompt corpus and a policy pool (polar/sample.py)
    polar data build ...      # records -> packed dataset on disk (polar/data_build.py)
    polar data scan ...       # the inputs' line counts, once for a build's machines (polar/data_scan.py)
    polar data stats ...      # counts, lengths, packing efficiency, shared-prefix savings (polar/data_stats.py)
    polar data synthetic ...  # the default run's synthetic policies as example files (polar/synthetic_files.py)
    polar format ...          # the official client's serving string and the server's ids (polar/format_cli.py)
    polar hparams ...         # the paper's learning-rate and batch-size laws (polar/hparams.py)
    polar plan ...            # which parallel layout to launch, its memory and step time (polar/plan.py)
    polar env                 # what this machine has

Each tool sub-command has its own --help.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile

from engine.called_as import launched_env
from polar.launch import TORCHRUN, call_forwarding_signals
from polar.presets import preset_names


_PRETRAIN_EPILOG = """\
examples:
  polar pretrain --nproc 1                                   # the default tiny_cpu run, a few minutes on CPU
  polar pretrain --nproc 8 --config polar_1_8b data.path=ds/ run_dir=runs/rm1   # on a built dataset
  polar pretrain --config polar_7b --print-config            # every setting, resolved

passed on to engine/pretrain.py:
  --config PRESET|FILE  a preset shipped with polar ({presets}) or a YAML file;
                        default tiny_cpu (a tiny model on synthetic data, minutes on CPU)
  --print-config        print the resolved config and exit
  --check-config        run the start-up checks (settings, kernels, data, a resume) for --nproc
                        processes and exit: 0 when the run would start, 2 with the error otherwise
                        (done before every launch)
  section.key=value     settings over the config, e.g. train.lr=1e-4 parallel.tp=2 run_dir=runs/x
{common}"""

_FINETUNE_EPILOG = """\
example:
  polar finetune --nproc 8 checkpoint.init_from=runs/rm1/checkpoints finetune.train=prefs.jsonl run_dir=runs/ft

passed on to engine/finetune.py (the paper's fine-tuning defaults, Sec. 3):
  checkpoint.init_from=DIR   the pre-trained model: a run's checkpoints/ directory, one step, or a
                             `polar convert hf-to-engine` output (required)
  finetune.train=FILE        official JSONL preference records (required); finetune.eval=FILE or
                             finetune.eval_fraction=0.05 for the held-out split
  --check-config             the start-up checks (settings, checkpoint, records) only: exit 0 or 2
  --print-config             print the resolved config (the fine-tuning defaults and yours) and exit
  --config FILE              optional: a YAML with a model section only (e.g. ckpt/base/model.yaml; the
                             presets set train.steps, which fine-tuning derives from finetune.epochs);
                             the model.* settings the checkpoint records are taken from it, and one
                             given must match it
  section.key=value          e.g. train.lr=2e-5 finetune.epochs=1 train.eval_interval=50
{common}"""


# the end of `polar pretrain --help` and `polar finetune --help`: where a run writes, how it ends
_RUN_COMMON = """
writes: run_dir (default {run_dir}): config.yaml, summary.json, metrics.jsonl, TensorBoard logs and checkpoints/
exit status: 0 done; 2 a bad setting, file or record (one `config error:` line, before torchrun starts);
  1 a failure that is not the settings' (torchrun's report; train.max_nonfinite_steps non-finite steps
  in a row among them); 143 stopped by SIGTERM after saving the step reached (the same command resumes)
"""

# the end of `polar --help`
_TOP_EPILOG = """\
Each command has its own --help, e.g. `polar data build --help`.

exit status, the same for every command: 0 done; 2 bad usage, settings or input (one line on stderr
  naming it; nothing half-written is left); 1 a failure that is not the input's (a worker killed, no
  layout that fits, a closed pipe); 130 / 143 stopped by Ctrl-C / SIGTERM (the same command continues)

environment:
  POLAR_NPROC              polar pretrain/finetune's --nproc when it is not given (default 2)
  POLAR_SHOW_ALL_WARNINGS  1: print the known harmless library warnings the commands hide
  POLAR_PEAK_TFLOPS        the GPU peak that training's MFU is measured against (default: measured)
  POLAR_SCORE_PIN_MEMORY   0: polar score/eval keep batches in pageable host memory (default 1)
  POLAR_SIGTERM_REPEAT_S   seconds after a first SIGTERM/Ctrl-C within which another is the same request
                           (default 5); one after it ends training or polar score/eval at once, unsaved
  POLAR_REWARD_URL, POLAR_REWARD_API_KEY   the server polar.reward's clients call (RL trainers)
"""


# set by `polar pretrain`/`finetune` for its start-up check and its run: the file keeping each start-up line
# printed (the recipe's notes on the data, the engine's, engine.pretrain.first_said), which a later process
# of the launch leaves out where it would print the same text; a line the check never printed (a torchrun
# restart's resume) is printed, where "the check ran" left every such line out
CHECKED_AT_LAUNCH = "POLAR_CHECKED_AT_LAUNCH"


def _launch(module: str, command: str):
    """`command` (`polar pretrain`): what the entry's usage and errors are to name, said in the environment
    of every process launched for it (engine.called_as)."""
    def launch(args, rest) -> int:
        if {"--print-config", "-h", "--help"} & set(rest):  # nothing to run: one process, no torchrun
            return subprocess.call([sys.executable, "-m", module, *rest], env=launched_env(command))
        # the start-up checks in one process first: a bad setting then ends with its one `config
        # error:` line and exit code 2, not torchrun's failure report around it (exit 1); with
        # --nproc 1 too, since that one process still runs under torchrun
        asked = "--check-config" in rest  # the check is all that was asked for
        with tempfile.TemporaryDirectory(prefix="polar-launch-") as kept:
            said = os.path.join(kept, "said")
            open(said, "w").close()
            env = launched_env(command, dict(os.environ, **{CHECKED_AT_LAUNCH: said}))
            code = call_forwarding_signals([sys.executable, "-m", module, *([] if asked else ["--check-config"]),
                                            *rest], env=dict(env, WORLD_SIZE=str(args.nproc), RANK="0"))
            if code or asked:
                return code
            cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={args.nproc}", "-m", module, *rest]
            print("+", " ".join(cmd), flush=True)
            return call_forwarding_signals(cmd, env=env)
    return launch


NPROC_ENV = "POLAR_NPROC"
NPROC_COMMANDS = ("pretrain", "finetune", "score", "eval")  # those taking --nproc (score, eval: polar.launch)


def _nproc(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:  # torchrun meets 0 with a bare AssertionError
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _default_nproc(p: argparse.ArgumentParser) -> int:
    """--nproc's default: $POLAR_NPROC, else 2. argparse checked an environment value as if it had been
    typed (`argument --nproc: must be a positive integer, got 0` to a command without --nproc)."""
    value = os.environ.get(NPROC_ENV)
    if value is None or not value.strip():  # set empty (`POLAR_NPROC=`) is unset, as POLAR_PEAK_TFLOPS's
        return 2
    try:
        return _nproc(value)
    except argparse.ArgumentTypeError as e:
        p.error(f"{NPROC_ENV}={value} (the default of --nproc): {e}")


def _version(name: str, dist: str | None = None) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # TE raises OSError on machines without CUDA libraries
        return f"not available ({type(e).__name__})"
    if dist is not None:
        # the installed release: megatron.core.__version__ appends the commit `git rev-parse` finds from
        # its install directory, which inside a project's work tree (install.sh's .venv) is the project's
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(dist)
        except PackageNotFoundError:  # imported from a source tree without installing it
            source = _source_release(mod, dist)
            if source:
                return source
    return str(getattr(mod, "__version__", "installed"))


def _source_release(mod, dist: str) -> str | None:
    """The release of a package run from a source tree never installed (`python -m polar.cli` in a
    checkout: no distribution's metadata, and polar has no __version__, so `polar --version` said
    `polar-rm installed`): its pyproject.toml's, said to be a source tree's; None where there is none."""
    import tomllib
    from pathlib import Path

    pyproject = Path(mod.__file__).resolve().parent.parent / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text()).get("project", {})
    except (OSError, ValueError):
        return None
    if project.get("name") != dist or "version" not in project:
        return None
    return f"{project['version']} (not installed: the source tree {pyproject.parent})"


def _env(args, rest) -> int:
    import torch

    rows = [
        ("polar-rm", _version("polar", "polar-rm")),
        ("python", sys.version.split()[0]),
        ("torch", torch.__version__),
        ("cuda", f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}"
                 if torch.cuda.is_available() else "none (CPU, gloo)"),
        ("triton", _version("triton")),
        ("megatron-core", _version("megatron.core", "megatron-core")),
        ("transformer-engine", _version("transformer_engine") if torch.cuda.is_available() else "not used on CPU"),
        ("engine._C (C++ packer)", _version("engine._C")),
        ("engine._C_cuda (CUDA kernels)", _version("engine._C_cuda")),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


# sub-command -> module whose main(argv) implements it; imported only when used
_TOOLS = {
    ("convert", "hf-to-engine"): ("polar.convert.hf_to_engine", "a transformers checkpoint (safetensors or GGUF) "
                                                            "-> an engine checkpoint with model.yaml and tokenizer/"),
    ("convert", "engine-to-hf"): ("polar.convert.engine_to_hf", "an engine checkpoint -> LlamaForSequence"
                                                                "Classification (--format internlm2-reward: "
                                                                "POLAR's layout)"),
    ("serve",): ("polar.serve.server", "reward server for RL trainers: SGLang/vLLM/lmdeploy/OpenRLHF/native "
                                       "endpoints, cross-request batching, shared prefixes"),
    ("eval",): ("polar.launch:eval_main", "preference accuracy with references on ranked data, overall and per "
                                          "category (engine/evaluate.py; --nproc N runs torchrun)"),
    ("score",): ("polar.launch:score_main", "offline batch scoring at any layout with the official client's "
                                            "exact format (engine/score.py; --nproc N runs torchrun)"),
    ("sample",): ("polar.sample", "pre-training triplets from a prompt corpus and a policy pool of "
                                  "OpenAI-compatible endpoints"),
    ("data", "build"): ("polar.data_build", "records (JSONL) -> tokenized, shared-prefix packed "
                                            "dataset on disk"),
    ("data", "scan"): ("polar.data_scan", "count the inputs' lines once for all machines of a build "
                                          "(polar data build --scan)"),
    ("data", "stats"): ("polar.data_stats", "counts, length histograms, packing efficiency and "
                                            "shared-prefix savings of a built dataset"),
    ("data", "synthetic"): ("polar.synthetic_files", "the default run's synthetic policies as files: triplets, "
                                                     "preference records, groups to score, ranked data"),
    ("format",): ("polar.format_cli", "the exact string the official POLAR client sends and the "
                                      "server's token ids, per structured input"),
    ("hparams",): ("polar.hparams", "learning rate and batch size from the paper's scaling laws"),
    ("plan",): ("polar.plan", "per-GPU memory and step time of every TP/PP/VPP/DP layout for a model and "
                              "cluster; ranks them and recommends one"),
}


def _tool(argv: list[str]):
    """(module, remaining argv) when argv names a tool sub-command, else None."""
    for words, (module, _) in _TOOLS.items():
        if tuple(argv[:len(words)]) == words:
            return module, argv[len(words):]
    return None


# the optional packages (pyproject's extras) -> the extra that installs each
OPTIONAL = {"fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "httpx": "client",
            "transformers": "convert", "safetensors": "convert", "accelerate": "convert", "gguf": "convert",
            "wandb": "wandb"}

_COMMANDS = ("pretrain", "finetune", "env")  # argparse's; the tools' first words are the others


def _unknown(word: str, known: list[str], where: str) -> str:
    """The line for a command word that names nothing: argparse named only its own three commands,
    and `polar data biuld` printed the usage without the word that was wrong."""
    from engine.near_miss import near_field

    near = near_field(word, known, cutoff=0.6)
    return (f"{where}: no command {word!r}" + (f" (did you mean {near!r}?)" if near else "")
            + f"; the commands: {', '.join(known)}")


_GROUPS = ("data", "convert")  # the first words of two-word tools (`polar data build`)


def _group_commands(group: str) -> list[str]:
    """The second words of `group`'s commands (`polar data build`: build), sorted."""
    return sorted(w[1] for w in _TOOLS if w[0] == group and len(w) == 2)


def _no_group_command(group: str, word: str | None) -> str:
    """The line for `polar data` (`group`) followed by `word`, which names none of its commands."""
    if word is None:
        return f"polar {group}: no command given"
    if word.startswith("-"):
        return f"polar {group}: unknown option {word!r}; a command first: polar {group} COMMAND --help"
    return _unknown(word, _group_commands(group), f"polar {group}")


def _option_first(argv: list[str], first_words: list[str]) -> str:
    """The line for an option before any command: `polar --nproc 2 pretrain` was told only `unknown option
    '--nproc'`, an option of pretrain's. polar's own are -h and --version; a command's options follow it,
    as the line shows the command reading where one comes later."""
    import shlex

    option = argv[0].split("=", 1)[0]
    at = next((i for i, w in enumerate(argv) if w in first_words), None)
    takers = f"(the commands that take it: {', '.join(NPROC_COMMANDS)})"
    if at is None:
        if option == "--nproc":
            return f"polar: --nproc goes after the command: polar COMMAND {shlex.join(argv)} {takers}"
        return f"polar: unknown option {argv[0]!r} (polar --help lists the commands and options)"
    tool = _tool(argv[at:])
    if tool is None and argv[at] in _GROUPS:
        # `polar --tp 2 data biuld` was told to run `polar data --tp 2 biuld`, which refuses any option there
        return _no_group_command(argv[at], argv[at + 1] if argv[at + 1:] else None)
    words = len(argv) - at - len(tool[1]) if tool else 1  # `data build`: the group's command too
    command = " ".join(argv[at:at + words])
    if option == "--nproc" and argv[at] not in NPROC_COMMANDS:
        # `polar --nproc 2 env` was told to run `polar env --nproc 2`, which env refuses
        return f"polar: unknown option '--nproc': polar {command} takes none {takers}"
    taken = _options_of(argv[at], tool[0] if tool else None)
    if taken is not None and not _takes(option, taken, {"--nproc"} if tool else set()):
        # `polar --bogus pretrain` was told to run `polar pretrain --bogus`, which pretrain refuses
        from engine.near_miss import near_option

        near = near_option(option, taken)
        return (f"polar: unknown option {option!r}: polar {command} takes none such"
                + (f" (did you mean {near!r}?)" if near else "") + f"; polar {command} --help lists its options")
    return (f"polar: {option} goes after the command: "
            f"{shlex.join(['polar', *argv[at:at + words], *argv[:at], *argv[at + words:]])}")


def _takes(option: str, options: set[str], typed_only: set[str] = frozenset()) -> bool:
    """Whether argparse takes `option` where `options` are its parser's: also a long option's unambiguous
    beginning (allow_abbrev, as every parser here has: `polar pretrain --conf x` runs; `polar --conf x
    pretrain` was told pretrain takes none such) and a short option with its value attached (`-ods`).
    `typed_only`: options not parsed by argparse (polar.launch's --nproc for score and eval)."""
    if option in options or (option[:2] in options and not option.startswith("--")):
        return True
    return len(option) > 2 and len([o for o in options - typed_only if o.startswith(option)]) == 1


class _Parsing(BaseException):
    """Raised in place of a command's first parse of its arguments (_options_of), to stop its main there. A
    BaseException, as SystemExit is: a main that wraps its parse in `except Exception` lets it through."""


def _options_of(first: str, entry: str | None) -> set[str] | None:
    """The options that the command whose first word is `first` takes (`entry`: a tool's module[:function];
    None for pretrain, finetune, env), read from its own argparse parser: its main, called with no
    arguments, is stopped at its first parse (every entry parses before it does anything). None where no
    parse was reached."""
    if first == "env":
        return {"-h", "--help"}
    # pretrain, finetune: what polar's own parser does not take (all but --nproc) goes to the engine's
    module, _, func = (entry or f"engine.{first}").partition(":")
    names = ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args")
    saved = {name: getattr(argparse.ArgumentParser, name) for name in names}

    parsers = []  # kept as it is caught: the options are known even where a main swallows _Parsing (a bare except)

    def caught(parser, *args, **kwargs):
        parsers.append(parser)
        raise _Parsing

    try:
        for name in names:
            setattr(argparse.ArgumentParser, name, caught)
        getattr(importlib.import_module(module), func or "main")([])
    except (_Parsing, Exception, SystemExit):  # Exception: an optional package missing (serve without its extra)
        pass
    finally:
        for name, method in saved.items():
            setattr(argparse.ArgumentParser, name, method)
    if not parsers:
        return None
    options = set(parsers[0]._option_string_actions)
    # --nproc: polar's own (pretrain, finetune) or polar.launch's (score, eval), taken before the entry parses
    return options | {"--nproc"} if first in NPROC_COMMANDS else options


def _usage_of_tools(group: str | None = None) -> str:
    shown = [(" ".join(w), h) for w, (_, h) in _TOOLS.items() if group in (None, w[0])]
    width = max(len(w) for w, _ in shown)
    return "\n".join(f"  polar {w:<{width}}  {h}" for w, h in shown)


def main(argv=None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a short output is still buffered here: its broken pipe is this one's too
        return code
    except BrokenPipeError:  # the reader went away (`polar data stats ds | head`): no traceback
        from engine.closed_pipe import reader_gone

        return reader_gone()


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from engine.quiet import silence_known_warnings

    silence_known_warnings()  # every tool that imports megatron (env, plan, data, ...) prints only what matters
    # The tools parse their own arguments (their --help is theirs), so they bypass argparse here.
    tool = _tool(argv)
    if tool is not None:
        module, rest = tool
        module, _, func = module.partition(":")
        try:
            return getattr(importlib.import_module(module), func or "main")(rest)
        except ModuleNotFoundError as e:
            # the package itself missing (`import uvicorn.x` without uvicorn names `uvicorn`); a module
            # missing inside an installed one (fastapi.responses) is a bug or a release's change, which
            # the extra would not install: its traceback stays
            extra = OPTIONAL.get(e.name or "")
            if extra is None:
                raise
            # a wheel installed without its extra: say which, not a traceback from deep in the tool
            print(f"polar {' '.join(argv[:len(argv) - len(rest)])}: needs the module {e.name!r}, which is not "
                  f"installed: pip install 'polar-rm[{extra}]'", file=sys.stderr)
            return 1
    for group in _GROUPS:
        if argv[:1] == [group]:
            subs = _group_commands(group)
            usage = f"usage: polar {group} {{{','.join(subs)}}} ...\n" + _usage_of_tools(group)
            if argv[1:2] in (["-h"], ["--help"]):
                print(usage)
                return 0
            print(usage, file=sys.stderr)
            # `polar data -x` printed the usage alone
            print(_no_group_command(group, argv[1] if argv[1:] else None), file=sys.stderr)
            return 2
    first_words = list(dict.fromkeys([*_COMMANDS, *(w[0] for w in _TOOLS)]))
    if argv and not argv[0].startswith("-") and argv[0] not in first_words:
        print(_unknown(argv[0], first_words, "polar"), file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog="polar", usage="polar [-h] [--version] COMMAND [ARGS ...]",
                                 description="POLAR reward models: pre-training, fine-tuning, data and tools.",
                                 epilog="tools:\n" + _usage_of_tools() + "\n\n" + _TOP_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"polar-rm {_version('polar', 'polar-rm')}")
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        # argparse said "the following arguments are required: command" to a bare `polar` and to
        # `polar -x`, under a usage that named 3 of the 12 commands
        ap.print_help(sys.stderr) if not argv else ap.print_usage(sys.stderr)
        print("polar: no command given" if not argv else _option_first(argv, first_words), file=sys.stderr)
        return 2
    sub = ap.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND", prog="polar")
    launchers = {}
    for name, module, what, epilog, run_dir in (
            ("pretrain", "engine.pretrain", "pre-train a reward model", _PRETRAIN_EPILOG, "runs/default"),
            ("finetune", "engine.finetune", "fine-tune a pre-trained reward model on preference records",
             _FINETUNE_EPILOG, "runs/finetune")):
        where = f"{module.replace('.', '/')}.py under torchrun"
        p = sub.add_parser(name, help=f"{what} ({where}); other arguments are passed on (--config, section.key=value)",
                           usage=f"polar {name} [-h] [--nproc N] [--config PRESET|FILE] [--print-config] "
                                 "[--check-config] [section.key=value ...]",
                           description=f"{what[0].upper()}{what[1:]}: {where}, --nproc processes on this machine.",
                           epilog=epilog.format(presets=", ".join(preset_names()),
                                                common=_RUN_COMMON.format(run_dir=run_dir)),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--nproc", type=_nproc, default=None, metavar="N",
                       help=f"processes on this machine (default: ${NPROC_ENV}, else 2)")
        p.set_defaults(func=_launch(module, f"polar {name}"))
        launchers[name] = p
    e = sub.add_parser("env", help="print the versions and devices polar sees",
                       description="The versions of polar, python, torch and the libraries it uses, and the "
                                   "GPUs it sees, one per line on stdout (to paste into a bug report).")
    e.set_defaults(func=_env)
    args, rest = ap.parse_known_args(argv)
    if args.command == "env" and rest:
        e.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in launchers and args.nproc is None:
        args.nproc = _default_nproc(launchers[args.command])
    return args.func(args, rest)


if __name__ == "__main__":
    sys.exit(main())
