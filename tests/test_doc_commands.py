"""Every command shown in README.md and docs/*.md is checked, and the cheap ones are run.

Commands are taken from fenced ```bash/sh/shell/console blocks (every line), from other fenced blocks (lines that
start with ``$ `` or with a known executable), from indented code blocks (lines that start with a known
executable) and from inline code spans in the prose that start with a known executable and have a ``--flag``.
Backslash continuations are joined, ``#`` comments dropped, and ``;`` / ``&&`` / ``|`` / ``for ... do ... done``
split into single commands.

Static check, for every command:
- the executable is known: a console script of setup.cfg, a repository script (``python scripts/x.py``,
  ``bash scripts/x.sh``), ``python -m module``, or one of EXTERNAL (gcloud, tensorboard, ...: not checked);
- every ``--flag`` appears in that command's own ``--help`` (run once per executable), and a value given to a
  flag with choices is one of them;
- every repository path (``scripts/``, ``gin/``, ``tests/``, ...) and shared-data path
  (``../shared/data/...``, ``$MEDITRON_SHARED_DATA/...``) exists; every ``--gin_file`` exists under gin/;
- ``meditron-train`` / ``meditron-aot`` commands: the gin files and ``--gin.NAME=VALUE`` bindings parse (gin
  refuses an unknown configurable or parameter) and, for training, no command-line macro goes unused (what the
  command itself refuses);
- ``bash scripts/launch_tpu.sh``: its own flags against its --help, the ``--slice`` preset exists, and the
  arguments after ``--`` are checked as the meditron-train command (with the preset's gin files) it starts.

Runs (RUNS below): the documented command itself, with the substitutions listed there (placeholders such as
HF_DIR become the real tiny model in the shared data and temporary folders; step counts and item counts become
tiny). The errors quoted in docs/troubleshooting.md are produced by their documented commands and checked for the
quoted text and exit status. Each entry must match a documented command, so a changed doc shows up here. Groups
that take more than ~10 s on a quiet machine are marked slow. Commands that need gcloud, TPUs, the 7B/70B weights
or hours stay static.
"""

from __future__ import annotations

import configparser
import dataclasses
import functools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from meditron_jax.data.paths import shared_data_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = sys.executable
BIN = pathlib.Path(PYTHON).parent
EXTERNAL = {
    *("gcloud", "gsutil", "huggingface-cli", "tensorboard", "dask", "git", "pip"),
    *("cd", "export", "echo", "ls", "cat", "kill", "mkdir", "rm"),
}
EXTERNAL_MODULES = {"build", "pip", "venv"}  # python -m X of tools outside the project: not checked
SHELL_WORDS = {"for", "done", "do", "then", "fi", "if"}
REPO_DIRS = ("scripts/", "bench/", "tests/", "gin/", "configs/", "docs/", "notebooks/", "meditron_jax/")
BASH_LANGS = {"bash", "sh", "shell", "console"}
LAUNCH = "scripts/launch_tpu.sh"
PREFIXES = {"nice", "time", "timeout", "env"}
# Commands that take --gin.NAME=VALUE bindings (True: a command-line macro nothing uses is an error there too).
GIN_COMMANDS = {
    "meditron-train": True,
    "scripts/train.py": True,
    "meditron-aot": False,
    "scripts/aot_compile.py": False,
}


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    out = {}
    for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines():
        name, target = (s.strip() for s in line.split("=", 1))
        out[name] = target
    return out


SCRIPTS = console_scripts()


@dataclasses.dataclass(frozen=True)
class Command:
    doc: str  # "docs/x.md:LINE"
    argv: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.argv)


def _is_command_start(line: str) -> bool:
    words = line.split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words:
        return False
    first = words[0]
    return (
        first in SCRIPTS
        or first in ("python", "python3", "bash", "meditron-lm-eval")
        or first.startswith(".venv/bin/")
        or (first in PREFIXES and len(words) > 1)
    )


def _split(line: str) -> list[list[str]]:
    """One shell line → its simple commands (tokens), comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    out = []
    for tokens in commands:
        while tokens and tokens[0] in SHELL_WORDS:
            if tokens[0] == "for":  # for X in a b c → nothing to run
                tokens = []
                break
            tokens = tokens[1:]
        if tokens:
            out.append(tokens)
    return out


def _logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out, buf, start = [], "", None
    for number, line in lines:
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf, start = "", None
    if buf:
        out.append((start, buf))
    return out


def extract(path: pathlib.Path, text: str | None = None) -> list[Command]:
    """The commands of one Markdown file."""
    text = path.read_text(encoding="utf-8") if text is None else text
    rel = path.relative_to(ROOT).as_posix() if path.is_absolute() else str(path)
    lines = text.splitlines()
    found: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if fence:
            lang, body, j = fence.group(2), [], i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                body.append((j + 1, lines[j]))
                j += 1
            for number, line in _logical_lines(body):
                stripped = line.strip()
                if stripped.startswith("$ "):
                    found.append((number, stripped[2:]))
                elif lang in BASH_LANGS and stripped and not stripped.startswith("#"):
                    found.append((number, stripped))
                elif lang not in BASH_LANGS and _is_command_start(stripped):
                    found.append((number, stripped))
            i = j + 1
            continue
        if lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            body, j = [], i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                body.append((j + 1, lines[j]))
                j += 1
            for number, line in _logical_lines(body):
                stripped = line.strip()
                if _is_command_start(stripped):
                    found.append((number, stripped))
            i = j
            continue
        for span in re.findall(r"`([^`]+)`", lines[i]):
            # An inline command with flags; fragments (`--a/--b`, `...`) are prose, not commands.
            if _is_command_start(span) and " --" in span and "..." not in span and "/--" not in span:
                found.append((i + 1, span))
        i += 1
    commands = []
    for number, line in found:
        for tokens in _split(line):
            commands.append(Command(f"{rel}:{number}", tuple(tokens)))
    return commands


ALL = [c for doc in DOCS for c in extract(doc)]


# ---------------------------------------------------------------------------------------------------- classify


@dataclasses.dataclass
class Resolved:
    kind: str  # "console" | "script" | "module" | "pytest" | "bash" | "source" | "external"
    name: str  # console script name, script path or module
    args: list[str]
    help_argv: list[str] | None


def resolve(command: Command) -> Resolved:
    words = list(command.argv)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]  # VAR=value prefix
    while words and words[0] in PREFIXES:
        head = words.pop(0)
        if head in ("nice", "timeout"):
            while words and (words[0].startswith("-") or words[0].isdigit()):
                if words[0] == "-n":
                    words.pop(0)
                words.pop(0)
    if not words:
        raise AssertionError(f"{command.doc}: empty command {command.text!r}")
    head, rest = words[0], words[1:]
    if head in (".", "source"):
        return Resolved("source", rest[0] if rest else "", rest[1:], None)
    name = head[len(".venv/bin/") :] if head.startswith(".venv/bin/") else head
    if head.startswith(("/", "~/")) and pathlib.Path(head).name in ("python", "python3", "pip"):
        return Resolved("external", head, rest, None)  # another environment's interpreter (MaxText's venv)
    if name in ("python", "python3"):
        if rest[:1] == ["-m"]:
            module, args = rest[1], rest[2:]
            if module == "pytest":
                return Resolved("pytest", module, args, None)
            if module in EXTERNAL_MODULES:
                return Resolved("external", module, args, None)
            return Resolved("module", module, args, [PYTHON, "-m", module, "--help"])
        script, args = rest[0], rest[1:]
        return Resolved("script", script, args, [PYTHON, str(ROOT / script), "--help"])
    if name == "bash":
        script, args = rest[0], rest[1:]
        if script == "scripts/quickstart.sh":  # its arguments go to meditron-quickstart
            return Resolved("bash", script, args, [str(BIN / "meditron-quickstart"), "--help"])
        if script == LAUNCH:  # its own flags, then `--` and the arguments of meditron-train / meditron-eval
            head = args[: args.index("--")] if "--" in args else args
            return Resolved("bash", script, head, ["bash", str(ROOT / script), "--help"])
        return Resolved("bash", script, [], None)  # scripts/test.sh: arguments go to pytest
    if name in SCRIPTS:
        if name == "meditron-lm-eval":
            if rest[:1] == ["write_tasks"]:
                return Resolved("console", name, rest, None)
            return Resolved("console", name, rest, [str(BIN / name), "run", "--help"])
        return Resolved("console", name, rest, [str(BIN / name), "--help"])
    if name in EXTERNAL:
        return Resolved("external", name, rest, None)
    raise AssertionError(
        f"{command.doc}: unknown executable {head!r} in {command.text!r}: not a console script of setup.cfg, a "
        "repository script or one of tests/test_doc_commands.py EXTERNAL"
    )


@functools.cache
def help_options(help_argv: tuple[str, ...]) -> tuple[dict[str, tuple[str, ...] | None], str]:
    """{--flag: choices or None} from a command's --help (its option lines only), and the raw text."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    proc = subprocess.run(list(help_argv), capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(help_argv)} exited {proc.returncode}:\n{text[-3000:]}"
    options: dict[str, tuple[str, ...] | None] = {}
    for line in text.splitlines():
        m = re.match(r"^\s+(-\S.*)$", line)
        if not m:
            continue
        spec = re.split(r"\s{2,}", m.group(1))[0]
        for part in spec.split(", "):
            flag = re.match(r"(--?[A-Za-z0-9][\w.-]*)(?:[ =](\{[^}]*\}))?", part.strip())
            if flag:
                choices = tuple(flag.group(2)[1:-1].split(",")) if flag.group(2) else None
                options[flag.group(1)] = choices
    return options, text


@functools.cache
def beam_options() -> frozenset[str]:
    """Apache Beam pipeline options: meditron-prepare-data passes unknown flags through to Beam."""
    import argparse

    from apache_beam.options.pipeline_options import PipelineOptions

    parser = argparse.ArgumentParser()

    def walk(cls):
        for sub in cls.__subclasses__():
            try:
                sub._add_argparse_args(parser)
            except argparse.ArgumentError:
                pass  # an option two subclasses both declare
            walk(sub)

    walk(PipelineOptions)
    return frozenset(s for action in parser._actions for s in action.option_strings)


# ----------------------------------------------------------------------------------------------------- checks


def _flags(args: list[str]) -> list[tuple[str, str | None]]:
    """(flag, value or None) for every --flag in args."""
    out = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        if "=" in arg:
            flag, value = arg.split("=", 1)
        else:
            flag = arg
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else None
        out.append((flag, value))
    return out


def _path_problems(args: list[str]) -> list[str]:
    problems = []
    values = [a.split("=", 1)[1] if a.startswith("--") and "=" in a else a for a in args]
    for value in values:
        value = value.strip("'\"")
        if value.startswith("./") and not (ROOT / value).exists():
            problems.append(f"{value} does not exist in the repository")
        if value.startswith(REPO_DIRS):
            path = value.split("::", 1)[0]
            if not list(ROOT.glob(path)):
                problems.append(f"{path} does not exist in the repository")
        for prefix in ("../shared/data/", "$MEDITRON_SHARED_DATA/", "${MEDITRON_SHARED_DATA}/"):
            if value.startswith(prefix):
                rel = value[len(prefix) :]
                if not (shared_data_dir() / rel).exists():
                    problems.append(f"{value}: {rel} is not in the shared data ({shared_data_dir()})")
    return problems


def _gin_file_problems(resolved: Resolved) -> list[str]:
    problems = []
    for flag, value in _flags(resolved.args):
        if flag == "--gin_file" and value:
            if not ((ROOT / "gin" / value).is_file() or (ROOT / value).is_file()):
                problems.append(f"--gin_file {value}: no such file under gin/ or the repository root")
    return problems


def launched(command: Command) -> Command | None:
    """The meditron-train (or, with --eval, meditron-eval) command that scripts/launch_tpu.sh runs on every host:
    the --slice preset's gin files (configs/tpu_slices.json) and the arguments after ``--``. None when there is
    nothing to check (no ``--``, or a ``...`` placeholder)."""
    argv = list(command.argv)
    if LAUNCH not in argv or "--" not in argv:
        return None
    head, tail = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    if "..." in tail:
        return None
    program = ["meditron-eval"] if "--eval" in head else ["meditron-train"]
    if "--slice" in head:
        presets = json.loads((ROOT / "configs" / "tpu_slices.json").read_text())
        preset = presets.get(head[head.index("--slice") + 1], {})
        program += [f"--gin_file={g}" for g in preset.get("gin", [])]
    return Command(command.doc, (*program, *tail))


def static_problems(command: Command) -> list[str]:
    resolved = resolve(command)
    problems = []
    if resolved.name == LAUNCH:
        head = list(command.argv[: command.argv.index("--")] if "--" in command.argv else command.argv)
        if "--slice" in head:
            presets = json.loads((ROOT / "configs" / "tpu_slices.json").read_text())
            name = head[head.index("--slice") + 1]
            if name not in presets:
                problems.append(f"--slice {name}: not a preset of configs/tpu_slices.json ({', '.join(presets)})")
        inner = launched(command)
        if inner is not None:
            problems += [f"after --: {p}" for p in static_problems(inner)]
    if resolved.kind in ("script", "bash") and not (ROOT / resolved.name).is_file():
        problems.append(f"{resolved.name} does not exist")
        return problems
    if resolved.kind == "module":
        top = resolved.name.split(".")[0]
        if top == "meditron_jax" and not any(
            (ROOT / p).exists() for p in (resolved.name.replace(".", "/") + ".py", resolved.name.replace(".", "/"))
        ):
            problems.append(f"module {resolved.name} does not exist")
            return problems
    problems += _path_problems(resolved.args if resolved.kind != "script" else [resolved.name, *resolved.args])
    problems += _gin_file_problems(resolved)
    if resolved.help_argv is None:
        return problems
    options, _ = help_options(tuple(resolved.help_argv))
    passthrough_beam = resolved.name in ("meditron-prepare-data", "scripts/prepare_gap_replay.py")
    for flag, value in _flags(resolved.args):
        if resolved.name in GIN_COMMANDS and flag.startswith("--gin."):
            continue  # gin bindings: checked by parsing (test_gin_bindings_parse)
        if flag not in options:
            if passthrough_beam and flag in beam_options():
                continue
            problems.append(f"{flag} is not an option of {' '.join(resolved.help_argv[:-1])} (see its --help)")
            continue
        choices = options[flag]
        if choices and value is not None and "$" not in value and value not in choices:
            problems.append(f"{flag} {value}: not one of {', '.join(choices)}")
    return problems


@pytest.mark.parametrize("command", ALL, ids=[f"{c.doc}:{c.argv[0]}" for c in ALL])
def test_documented_command_is_valid(command):
    problems = static_problems(command)
    assert not problems, f"{command.doc}: {command.text}\n  " + "\n  ".join(problems)


def _gin_commands() -> list[tuple[Command, list[str], list[str], bool]]:
    out = []
    for command in [*ALL, *filter(None, map(launched, ALL))]:
        resolved = resolve(command)
        if resolved.name not in GIN_COMMANDS:
            continue
        files = [v for f, v in _flags(resolved.args) if f == "--gin_file" and v]
        bindings = [a[len("--gin.") :] for a in resolved.args if a.startswith("--gin.")]
        out.append((command, files, bindings, GIN_COMMANDS[resolved.name]))
    return out


def gin_problems(files: list[str], bindings: list[str], check_macros: bool = True) -> str | None:
    """What the command's own gin parsing would refuse, without training or compiling."""
    import gin

    import meditron_jax.data.pipeline  # noqa: F401  (registers the configurables the recipes bind)
    import meditron_jax.data.tasks  # noqa: F401
    from meditron_jax.cli.train import unused_macros
    from meditron_jax.resources import gin_dir
    from meditron_jax.train import trainer  # noqa: F401

    gin.clear_config()
    try:
        for path in (gin_dir(), gin_dir().parent):
            if str(path) not in gin.config._LOCATION_PREFIXES:  # the search path outlives clear_config
                gin.add_config_file_search_path(str(path))
        gin.parse_config_files_and_bindings(files, bindings)
        unused = unused_macros(gin.config_str(), bindings) if check_macros else []
        if unused:
            return f"--gin.{unused[0]}=... binds a macro that no gin file uses"
    except (ValueError, OSError) as e:
        return f"gin refuses it: {e}"
    finally:
        gin.clear_config()
    return None


def test_gin_bindings_parse():
    commands = _gin_commands()
    assert any(resolve(c).name == "meditron-train" for c, *_ in commands), "no meditron-train command in the docs?"
    failures = []
    for command, files, bindings, check_macros in commands:
        problem = gin_problems(files, bindings, check_macros)
        if problem:
            failures.append(f"{command.doc}: {command.text}\n  {problem}")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Run:
    """A documented command (``doc`` file, regex ``match`` on its text) run with substitutions.

    ``replace``: (old, new) applied to every argument ({tmp}, {shared} and {root} are filled in);
    ``set_flags``: flag → new value (the flag must be in the command); ``extra``: arguments appended."""

    doc: str
    match: str
    replace: tuple[tuple[str, str], ...] = ()
    set_flags: tuple[tuple[str, str], ...] = ()
    extra: tuple[str, ...] = ()
    expect_output: str = ""
    expect_exit: int = 0
    expect_file: str = ""  # relative to the group's temporary folder


STORIES = "{shared}/stories260K_hf"

# name → the documented commands run in order in one temporary folder, and whether the group is slow.
RUNS: dict[str, tuple[bool, tuple[Run, ...]]] = {
    # README "Convert checkpoints": HF_DIR is the real tiny Llama; the round trip goes through {tmp}.
    "readme_convert": (
        False,
        (
            Run(
                "README.md",
                r"meditron-convert --to orbax --input HF_DIR --output ORBAX_DIR$",
                replace=(("HF_DIR", STORIES), ("ORBAX_DIR", "{tmp}/orbax")),
                expect_file="orbax/meditron_config.json",
            ),
            Run(
                "README.md",
                r"meditron-convert --to hf --input ORBAX_DIR --output HF_DIR --dtype bfloat16$",
                replace=(("ORBAX_DIR", "{tmp}/orbax"), ("HF_DIR", "{tmp}/hf")),
                expect_file="hf/config.json",
            ),
        ),
    ),
    # docs/evaluation.md: `--help` as written. Its stories260K smoke run is tests/test_eval_cli.py::
    # test_cli_stories260k_pubmedqa, and the tiny v5e compile of docs/parallelism.md is tests/test_aot.py::
    # test_aot_compile_tiny_for_v5e_slice (both slow); here they are checked statically only.
    "evaluation_help": (False, (Run("docs/evaluation.md", r"scripts/evaluate.py --help$", expect_output="--chat"),)),
    # README "Train": curation capped at 3 documents per file, then 2 training steps; then troubleshooting errors.
    "readme_train": (
        True,
        (
            Run(
                "README.md",
                r"meditron-prepare-data --input_dir ../shared/data/gap_replay_sample --output_dir /tmp/gap_replay$",
                replace=(("../shared/data", "{shared}"), ("/tmp/gap_replay", "{tmp}/gap_replay")),
                extra=("--max_docs_per_file", "3"),
            ),
            Run(
                "README.md",
                r"meditron-train --gin_file=runs/tiny_cpu.gin --gin.MODEL_DIR=",
                replace=(("/tmp/tiny_run", "{tmp}/tiny_run"), ("/tmp/gap_replay", "{tmp}/gap_replay")),
                extra=(
                    "--gin.TRAIN_STEPS=2",
                    "--gin.OptimizerConfig.warmup_steps=1",
                    "--gin.TrainConfig.log_every=1",
                    "--gin.TrainConfig.checkpoint_every=2",
                ),
                expect_output="step 2/2",
            ),
            # docs/troubleshooting.md on the same folders: a 3-layer model against the 2-layer checkpoint, and
            # Llama-2's 32,000-token vocabulary against the curated corpus's marker tokens.
            Run(
                "docs/troubleshooting.md",
                r"meditron-train .*--gin.ModelConfig.num_layers=3$",
                replace=(("/tmp/hdocs/run", "{tmp}/tiny_run"), ("/tmp/hdocs/gap", "{tmp}/gap_replay")),
                expect_output="does not match this run's model/optimizer",
                expect_exit=1,
            ),
            Run(
                "docs/troubleshooting.md",
                r"meditron-train .*--gin.ModelConfig.vocab_size=32000$",
                replace=(("/tmp/hdocs/run32k", "{tmp}/run32k"), ("/tmp/hdocs/gap", "{tmp}/gap_replay")),
                expect_output="is tokenized with 32017 tokens, but the model's vocabulary has 32000 tokens",
                expect_exit=1,
            ),
        ),
    ),
    # docs/troubleshooting.md: each error is produced by the documented command and says what the page quotes.
    "troubleshooting_tokenizer": (
        False,
        (
            Run(
                "docs/troubleshooting.md",
                r"meditron-generate --model_dir ../shared/data/stories260K_hf --tokenizer_path",
                replace=(("../shared/data", "{shared}"),),
                expect_output="tokenizer has 32000 tokens but the model only 512",
                expect_exit=1,
            ),
        ),
    ),
    "troubleshooting_mesh": (
        False,  # ~2-3 s on a quiet machine
        (
            Run(
                "docs/troubleshooting.md",
                r"meditron-aot --model llama2-13b --topology v5p-32 .*tensor=16$",
                expect_output="error: tensor=16 does not divide num_heads=40 of llama2-13b",
                expect_exit=1,
            ),
            Run(
                "docs/troubleshooting.md",
                r"meditron-aot --model tiny --topology v5e-4 --seq_len 128 --global_batch 6 --mesh fsdp=-1$",
                expect_output="error: batch of 6 sequences per accumulation step (global 6 / grad_accum_steps=1) "
                "does not split over the 4 batch shards",
                expect_exit=1,
            ),
        ),
    ),
    "troubleshooting_oom": (
        False,  # ~2-3 s on a quiet machine
        (
            Run(
                "docs/troubleshooting.md",
                r"meditron-aot --model tiny --topology v5e-4 --seq_len 4096 .*--remat none$",
                expect_output="-> DOES NOT FIT",
                expect_exit=3,
            ),
        ),
    ),
}


def find(run: Run) -> list[Command]:
    return [c for c in ALL if c.doc.startswith(run.doc + ":") and re.search(run.match, c.text)]


def substituted(run: Run, tmp: pathlib.Path) -> list[str]:
    command = find(run)[0]  # a doc may show the same command twice (a list and a transcript)
    resolved = resolve(command)
    fill = {"{tmp}": str(tmp), "{shared}": str(shared_data_dir()), "{root}": str(ROOT)}

    def sub(arg: str) -> str:
        for old, new in run.replace:
            for key, val in fill.items():
                new = new.replace(key, val)
            arg = arg.replace(old, new)
        return arg

    args = [sub(a) for a in resolved.args]
    for flag, value in run.set_flags:
        assert flag in args, f"{command.doc}: {flag} is not in {command.text!r}; update RUNS"
        args[args.index(flag) + 1] = value
    args += list(run.extra)
    if resolved.kind == "console":
        return [str(BIN / resolved.name), *args]
    if resolved.kind == "script":
        return [PYTHON, str(ROOT / resolved.name), *args]
    if resolved.kind == "module":
        return [PYTHON, "-m", resolved.name, *args]
    raise AssertionError(f"{command.doc}: cannot run {resolved.kind} commands")


def test_every_run_entry_matches_one_documented_command():
    for name, (_, runs) in RUNS.items():
        for run in runs:
            matches = find(run)
            assert len(set(m.text for m in matches)) == 1, (
                f"RUNS[{name!r}] should match one command of {run.doc} ({run.match!r}), found {len(matches)}; "
                "the doc changed: update tests/test_doc_commands.py RUNS"
            )


def _run_group(name: str, tmp_path: pathlib.Path) -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)  # the commands run as users run them: one CPU device
    for run in RUNS[name][1]:
        argv = substituted(run, tmp_path)
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == run.expect_exit, f"{' '.join(argv)} exited {proc.returncode}:\n{out[-4000:]}"
        assert run.expect_output in out, f"{' '.join(argv)}: {run.expect_output!r} not in its output:\n{out[-3000:]}"
        if run.expect_file:
            assert (tmp_path / run.expect_file).is_file(), f"{' '.join(argv)} did not write {run.expect_file}"


@pytest.mark.parametrize("name", [n for n, (slow, _) in RUNS.items() if not slow])
def test_cheap_documented_commands_run(name, tmp_path):
    _run_group(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, (slow, _) in RUNS.items() if slow])
def test_slow_documented_commands_run(name, tmp_path):
    _run_group(name, tmp_path)


# ------------------------------------------------------------------------------------------ the checker itself


def test_checker_catches_a_missing_flag_file_and_binding():
    """Plant bad commands in a fake doc: each must be reported (so a real doc with one fails above)."""
    fake = "\n".join(
        [
            "```bash",
            ".venv/bin/meditron-convert --to hf --input A --output B --no_such_flag",
            "python scripts/no_such_script.py --help",
            "meditron-train --gin_file=runs/no_such_recipe.gin --gin.MODEL_DIR=\"'/x'\"",
            "python scripts/evaluate.py --checkpoint C --benchmark medqa5 --output D",
            "frobnicate --all",
            "bash scripts/launch_tpu.sh --name n --zone z --slice nope -- --gin_file=runs/tiny_cpu.gin --no_such",
            "```",
        ]
    )
    commands = extract(ROOT / "docs" / "fake.md", fake)
    assert [c.doc for c in commands] == [f"docs/fake.md:{n}" for n in range(2, 8)]
    assert any("--no_such_flag is not an option" in p for p in static_problems(commands[0]))
    assert static_problems(commands[1]) == ["scripts/no_such_script.py does not exist"]
    assert any("runs/no_such_recipe.gin: no such file" in p for p in static_problems(commands[2]))
    assert any("--benchmark medqa5: not one of" in p for p in static_problems(commands[3]))
    with pytest.raises(AssertionError, match="unknown executable 'frobnicate'"):
        resolve(commands[4])
    launch = static_problems(commands[5])
    assert any("--slice nope: not a preset" in p for p in launch), launch
    assert any("after --: --no_such is not an option of" in p for p in launch), launch
    run = ["MODEL_DIR='/x'"]
    assert "binds a macro that no gin file uses" in gin_problems(["runs/tiny_cpu.gin"], [*run, "TRAIN_STEP=5"])
    assert "no_such_field" in gin_problems(["runs/tiny_cpu.gin"], [*run, "TrainConfig.no_such_field=5"])
    assert gin_problems(["runs/tiny_cpu.gin"], [*run, "TRAIN_STEPS=5"]) is None


def test_extractor_joins_continuations_and_splits_loops():
    fake = "\n".join(
        [
            "Text.",
            "",
            "    python scripts/aot_compile.py --model tiny \\",
            "        --topology v5e-4",
            "",
            "```bash",
            "for b in medqa medmcqa; do python scripts/evaluate.py --benchmark $b --output o/$b; done  # loop",
            "```",
            "```",
            "$ meditron-generate --prompt 'a # b'",
            "output line",
            "```",
        ]
    )
    commands = extract(ROOT / "docs" / "fake.md", fake)
    assert [c.argv for c in commands] == [
        ("python", "scripts/aot_compile.py", "--model", "tiny", "--topology", "v5e-4"),
        ("python", "scripts/evaluate.py", "--benchmark", "$b", "--output", "o/$b"),
        ("meditron-generate", "--prompt", "a # b"),
    ]
