"""Every shell command in README.md and docs/*.md, checked against the code it calls, without running anything.

A fenced block (```bash, ```sh, ```console or unmarked) is read as shell: backslash-continued lines joined,
comments and `$ ` prompts stripped, commands split at `&&`, `||`, `;` and `|`. A command that starts one of the
project's entry points is then checked against the real parser of that entry point:

- `python tools/X.py ...` / `python -m pirl_trainer.tools.X ...`: the script's own argparse parser, obtained by
  calling its main() with argparse's parsing intercepted (nothing after the parse runs); every flag must be one
  of its options, written in full, and every value must parse;
- `python train/X.py ...` and `accelerate launch [accelerate's flags] train/X.py ...`: for a config-driven script
  (pirl.py, linear_probe.py) its --config files and `--section.key=value` overrides go through the real config
  code (train/config.py, merge_config): an unknown key or a value of the wrong type is an error; accelerate's
  own flags go through accelerate's launch parser;
- `docker run [docker's flags] IMAGE ARGS`: ARGS as the Dockerfile's ENTRYPOINT would receive them.

Usage notation is allowed: `[--flag VALUE]` (optional), `...` (more of the same), and placeholder values such as
`DIR`, `OUT.json`, `$VAR`, `<x>` or `/data/...`; a flag or key name never is a placeholder (`--section.key=value`
is the one spelling of "any override"). Every token naming a repository path (tools/, train/, pipelines/, model/,
docs/, tests/) must exist; an output (--output/--out/--json/--plot/--trace, or a redirection) needs its folder.
The usage lines of the scripts' own docstrings (tools/*.py, train/*.py) are checked the same way.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import json
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

from pirl_trainer.train import config as train_config

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "shell-session", "zsh"}
PROMPTED_LANGS = {"console", "shell-session"}
REPO_DIRS = ("tools/", "train/", "pipelines/", "model/", "docs/", "tests/")
PACKAGE = "pirl_trainer"
OUTPUT_OPTIONS = {"--output", "--out", "--json", "--plot", "--trace"}
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
REDIRECTS = {">", ">>", "<", ">&", "&>", ">|"}
ANY_OVERRIDE = "--section.key=value"  # usage notation for "any config override"
WRAPPERS = {"srun", "env", "time", "nohup", "exec", "timeout", "sudo", "uv"}  # run the command that follows
PROGRAMS = r"python(3(\.\d+)?)?|accelerate|docker"
# (module, subcommand) whose arguments beyond its own options are training-config overrides
PASSTHROUGH = {("pirl_trainer.tools.profile", "step"), ("pirl_trainer.tools.profile", "probe")}
SET_OPTIONS = {"pirl_trainer.tools.paper_table": "set"}  # `--set KEY=VALUE ...` (with the tool's --config)
# docker run's options that take a value (the rest are flags)
DOCKER_VALUE_OPTIONS = {
    "-v", "--volume", "-e", "--env", "--env-file", "--gpus", "--name", "-w", "--workdir", "--shm-size", "--network",
    "--mount", "-p", "--publish", "--entrypoint", "-u", "--user", "--ipc", "--runtime", "--cpus", "-m", "--memory",
    "--device", "--ulimit", "--cap-add", "--security-opt", "-l", "--label", "--hostname", "-h", "--add-host",
    "--platform", "--pid", "--restart", "--cidfile", "--group-add", "--tmpfs", "--cpuset-cpus", "--log-driver",
}
_PLACEHOLDER = re.compile(r"\.\.\.|\$|<[^>]*>|\*|(^|/)[A-Z][A-Z0-9_]*(\.[A-Za-z0-9]+)?(/|$)")


def is_placeholder(value: str) -> bool:
    return bool(_PLACEHOLDER.search(value))


@dataclasses.dataclass
class Command:
    file: str
    line: int
    text: str
    tokens: list[str]
    redirects: list[str]  # redirection targets (outputs)
    shell: bool  # from a block marked as shell (unmarked blocks may hold output: only entry points are checked)

    def where(self) -> str:
        return f"{self.file}:{self.line}: `{self.text}`"


# ---------------------------------------------------------------------------------------------------- parsing


def fenced_commands(text: str, name: str) -> list[Command]:
    """The commands of every shell-like fenced block of a markdown text, with the line each starts on."""
    commands: list[Command] = []
    fence: str | None = None
    lang = ""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if fence is None:
            match = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if match:
                fence, lang = match.group(1), match.group(2).lower()
            continue
        if stripped.startswith(fence) and not stripped[len(fence):].strip():
            fence, pending = None, []
            continue
        if lang not in SHELL_LANGS:
            continue
        if not pending:
            start = number
            if stripped.startswith("$ "):
                raw = stripped[2:]
            elif lang in PROMPTED_LANGS:
                continue  # a transcript: lines without a prompt are output
        line = raw.rstrip()
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        commands += split_commands(" ".join(part.strip() for part in pending), name, start, shell=lang != "")
        pending = []
    return commands


def split_commands(line: str, name: str, number: int, shell: bool) -> list[Command]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as err:  # unbalanced quotes
        if not shell:
            return []
        return [Command(name, number, line.strip(), ["<unparsable>", str(err)], [], shell)]
    text = line.split(" #")[0].strip()
    out: list[Command] = []
    current: list[str] = []
    redirects: list[str] = []
    i = 0
    while i <= len(tokens):
        token = tokens[i] if i < len(tokens) else ";"
        if token in SEPARATORS:
            if current:
                out.append(Command(name, number, text, current, redirects, shell))
            current, redirects = [], []
        elif token in REDIRECTS:
            if current and current[-1].isdigit():
                current.pop()  # the 2 of 2>
            if i + 1 < len(tokens):
                redirects.append(tokens[i + 1])
            i += 1
        else:
            current.append(usage_token(token))
        i += 1
    return out


def usage_token(token: str) -> str:
    """`[--flag` -> `--flag`, `VALUE]` -> `VALUE`: optional parts are checked like the rest (`[a,b]` stays)."""
    if token == "[...]":
        return "..."
    if token.startswith("[-"):
        token = token[1:]
    while token.endswith("]") and token.count("]") > token.count("["):
        token = token[:-1]
    return token


# ---------------------------------------------------------------------------------------------------- paths


def path_problems(command: Command) -> list[str]:
    problems = []
    tokens = command.tokens
    for i, token in enumerate(tokens):
        option, eq, value = token.partition("=") if token.startswith("-") else ("", "", token)
        if token.startswith("-") and not eq:
            continue
        output = (option or (tokens[i - 1] if i else "")) in OUTPUT_OPTIONS
        problems += check_path(value, output)
    for target in command.redirects:
        problems += check_path(target, output=True)
    return problems


def check_path(value: str, output: bool = False) -> list[str]:
    value = value.removeprefix("./").split("::")[0]  # pytest's FILE::TEST
    if not value.startswith(REPO_DIRS):
        return []
    path = REPO / value
    if path.exists() or (output and path.parent.is_dir()):
        return []
    if is_placeholder(value):
        if any(ch in value for ch in "*?") and "..." not in value and not re.search(r"[$<]", value):
            return [] if list(REPO.glob(value)) else [f"no repository path matches {value}"]
        known = re.split(r"\.\.\.|\$|<|\*|\b[A-Z][A-Z0-9_]*\b", value)[0]
        folder = known if known.endswith("/") else known.rsplit("/", 1)[0] + "/"
        return [] if (REPO / folder).is_dir() else [f"no such folder {folder} (in {value})"]
    return [f"no such {'folder for the output' if output else 'path'}: {value}"]


# ---------------------------------------------------------------------------------------------------- argparse


class _Captured(Exception):
    def __init__(self, **what):
        super().__init__()
        self.what = what


class _ParseError(Exception):
    pass


def _arity(action: argparse.Action):
    if action.nargs is None:
        return 1
    if action.nargs == argparse.OPTIONAL or action.nargs in (argparse.ZERO_OR_MORE, argparse.ONE_OR_MORE):
        return action.nargs
    if action.nargs == argparse.REMAINDER:
        return argparse.ZERO_OR_MORE
    return int(action.nargs)


def _fill(action: argparse.Action | None, value: str) -> str:
    """A placeholder value replaced by one the option's type accepts: the check is of names, not of values."""
    if action is None or not is_placeholder(value):
        return value
    if action.choices:
        return str(next(iter(action.choices)))
    if action.type is not None:
        for candidate in ("1", "0.5", "x"):
            try:
                action.type(candidate)
                return candidate
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                continue
    return value


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def prepare(parser: argparse.ArgumentParser, tokens: list[str], stop_at_positional: bool = False):
    """(tokens with placeholder values made parseable and usage `...` dropped, the subcommand, problems)."""
    out: list[str] = []
    problems: list[str] = []
    current, command = parser, None
    after_unknown = False  # the previous token is an option the parser does not know (its value may follow)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == ANY_OVERRIDE:
            continue
        if token.startswith("-") and token != "-" and not re.fullmatch(r"-\d.*", token):
            option, eq, value = token.partition("=")
            action = current._option_string_actions.get(option)
            if action is None:
                longer = [o for o in current._option_string_actions if o.startswith(option) and option.startswith("--")]
                if longer:
                    problems.append(f"{option} is an abbreviation of {' / '.join(sorted(longer))}: write it in full")
                out.append(token)
                after_unknown = not eq
                continue
            after_unknown = False
            if eq:
                out.append(f"{option}={_fill(action, value)}")
                continue
            out.append(token)
            arity = _arity(action)
            if arity == argparse.OPTIONAL:
                take = 1 if i < len(tokens) and not tokens[i].startswith("-") else 0
            elif arity in (argparse.ZERO_OR_MORE, argparse.ONE_OR_MORE):
                take = 0
                while i + take < len(tokens) and not tokens[i + take].startswith("-"):
                    take += 1
            else:
                take = arity
            values = tokens[i : i + take]
            if arity in (argparse.ZERO_OR_MORE, argparse.ONE_OR_MORE):
                values = [v for v in values if v != "..."]  # `--set A=1 ...`: more of the same
            out += [_fill(action, v) for v in values]
            i += take
            continue
        subparsers = _subparsers(current)
        if command is None and token in subparsers:
            command, current = token, subparsers[token]
            out.append(token)
        elif token == "..." and not after_unknown:
            pass
        elif stop_at_positional:
            out += tokens[i - 1 :]
            break
        else:
            out.append(token)
        after_unknown = False
    return out, command, problems


@contextlib.contextmanager
def parse_errors_raise():
    """argparse's error() and exit() raise instead of ending the test process."""
    def error(self, message):
        raise _ParseError(f"{self.prog}: {message}")

    def exit_(self, status=0, message=None):
        raise _ParseError("") if status == 0 else _ParseError(f"{self.prog}: {message}")

    with mock.patch.object(argparse.ArgumentParser, "error", error), \
            mock.patch.object(argparse.ArgumentParser, "exit", exit_):
        yield


def parse(parser: argparse.ArgumentParser, tokens: list[str]):
    """(namespace, unknown tokens, problem or None); a --help gives a None namespace and no problem."""
    with parse_errors_raise(), contextlib.redirect_stdout(io.StringIO()):
        try:
            ns, extra = parser.parse_known_args(tokens)
        except _ParseError as err:
            return None, [], (str(err) or None)
    return ns, extra, None


def capture(module) -> dict:
    """What the script's main() parses with: {"parser": ...} (argparse) or {"schema": ...} (config_from_cli)."""
    def fake_parse(self, args=None, namespace=None):
        raise _Captured(parser=self)

    def fake_config_from_cli(schema, argv, description, resumable=True):
        raise _Captured(schema=schema, description=description, resumable=resumable)

    patches = [mock.patch.object(argparse.ArgumentParser, "parse_known_args", fake_parse)]
    if hasattr(module, "config_from_cli"):
        patches.append(mock.patch.object(module, "config_from_cli", fake_config_from_cli))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        try:
            if inspect.signature(module.main).parameters:
                module.main([])
            else:
                module.main()
        except _Captured as captured:
            return captured.what
    raise AssertionError(f"{module.__name__}.main() returned without parsing a command line")


# ---------------------------------------------------------------------------------------------------- configs


def config_overrides(tokens: list[str]) -> list[str]:
    """Overrides with placeholder values as ??? (merge_config then checks the key only)."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--") and "=" not in token and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            token, i = f"{token}={tokens[i + 1]}", i + 1
        key, eq, value = token.partition("=")
        out.append(f"{key}=???" if eq and is_placeholder(value) else token)
        i += 1
    return out


def config_problems(schema: type, files: list[str] | None, overrides: list[str]) -> list[str]:
    paths = [str(REPO / f) for f in files or [] if not is_placeholder(f)]
    try:
        train_config.merge_config(schema, paths, config_overrides(overrides))
    except train_config.ConfigError as err:
        return [str(err).replace(str(REPO) + "/", "")]
    return []


# ---------------------------------------------------------------------------------------------------- commands


def module_for(script: str) -> str | None:
    """tools/X.py -> pirl_trainer.tools.X; None for a file outside the project's script folders."""
    match = re.fullmatch(r"(?:\./)?(tools|train)/(\w+)\.py", script)
    return f"{PACKAGE}.{match.group(1)}.{match.group(2)}" if match else None


def check_script(script: str, args: list[str]) -> tuple[list[str], bool]:
    """(problems, whether it is a project entry point) for `python SCRIPT ARGS`."""
    name = module_for(script)
    if name is None or is_placeholder(script):  # `python tools/NAME.py`: a pattern, not a command
        return [], False
    if not (REPO / script).is_file():
        return [f"no such script: {script}"], True
    return check_module(name, args), True


def check_module(name: str, args: list[str]) -> list[str]:
    module = importlib.import_module(name)
    if not hasattr(module, "main"):
        return [f"{name} has no main()"]
    what = capture(module)
    if "schema" in what:
        parser = train_config.build_parser(what["description"], what["resumable"], what["schema"])
        tokens, _, problems = prepare(parser, args)
        ns, overrides, error = parse(parser, tokens)
        if error or ns is None:
            return problems + ([error] if error else [])
        return problems + config_problems(what["schema"], ns.config, overrides)
    parser = what["parser"]
    tokens, subcommand, problems = prepare(parser, args)
    ns, extra, error = parse(parser, tokens)
    if error or ns is None:
        return problems + ([error] if error else [])
    if (name, subcommand) in PASSTHROUGH:
        config_file = getattr(ns, "config", None)
        problems += config_problems(train_config.PirlConfig, [config_file] if config_file else [], extra)
    elif extra:
        problems.append(f"{parser.prog}: unrecognized arguments: {' '.join(extra)}")
    if SET_OPTIONS.get(name):
        items = getattr(ns, SET_OPTIONS[name]) or []
        config_file = getattr(ns, "config", None)
        problems += config_problems(train_config.PirlConfig, [config_file] if config_file else [],
                                    [f"--{item}" for item in items])
    return problems


def check_python(args: list[str]) -> tuple[list[str], bool]:
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-m", "-c"):
        i += 2 if args[i] in ("-W", "-X") else 1
    if i >= len(args) or args[i] == "-c":
        return [], False
    if args[i] == "-m":
        module = args[i + 1] if i + 1 < len(args) else ""
        if module.split(".")[0] in ("tools", "train", "model", "pipelines"):
            return [f"`python -m {module}`: the package is {PACKAGE} (python -m {PACKAGE}.{module})"], True
        if module.startswith(f"{PACKAGE}.tools.") or module.startswith(f"{PACKAGE}.train."):
            if importlib.util.find_spec(module) is None:
                return [f"no such module: {module}"], True
            return check_module(module, args[i + 2 :]), True
        return [], False
    return check_script(args[i], args[i + 1 :])


def check_accelerate(args: list[str]) -> tuple[list[str], bool]:
    if not args or args[0] != "launch":
        return [], False
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    tokens, _, problems = prepare(parser, args[1:], stop_at_positional=True)
    ns, extra, error = parse(parser, tokens)
    if error:
        return problems + [error], True
    if ns is None:
        return problems, True
    if extra:
        return problems + [f"accelerate launch: unrecognized arguments: {' '.join(extra)}"], True
    if ns.no_python:
        return problems, True
    if ns.module:
        return problems + check_python(["-m", ns.training_script, *ns.training_script_args])[0], True
    script_problems, entry = check_script(ns.training_script, ns.training_script_args)
    if not entry:
        script_problems = [f"accelerate launch runs {ns.training_script}, not a train/ or tools/ script"]
    return problems + script_problems, True


def dockerfile_entrypoint() -> list[str] | None:
    dockerfile = REPO / "Dockerfile"
    if not dockerfile.is_file():
        return None
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile.read_text(), re.MULTILINE)
    return json.loads(match.group(1)) if match else None


def check_docker(args: list[str]) -> tuple[list[str], bool]:
    entrypoint = dockerfile_entrypoint()
    if not args or args[0] != "run" or entrypoint is None:
        return [], False
    i = 1
    while i < len(args) and args[i].startswith("-"):
        if args[i] == "--entrypoint" or args[i].startswith("--entrypoint="):
            return [], False
        i += 2 if args[i] in DOCKER_VALUE_OPTIONS else 1
    if i >= len(args):
        return ["docker run: no image"], True
    if entrypoint[1:] == ["tools/docker_entry.py"]:  # [accelerate launch's flags --] [the trainer's arguments]
        from pirl_trainer.tools import docker_entry

        try:
            accelerate_args, trainer_args = docker_entry.split_arguments(args[i + 1 :])
        except docker_entry.EntryError as err:
            return [str(err).splitlines()[0]], True
        return dispatch(["accelerate", "launch", *accelerate_args, "train/pirl.py", *trainer_args])
    return dispatch(entrypoint + args[i + 1 :])


def check_bare_overrides(tokens: list[str]) -> tuple[list[str], bool]:
    """A line of nothing but `--section.key=value` overrides (a snippet to add to a training command)."""
    if not tokens or not all(re.fullmatch(r"--\w+(\.\w+)+=\S*", t) or t == "..." for t in tokens):
        return [], False
    return config_problems(train_config.PirlConfig, [], [t for t in tokens if t != "..."]), True


def dispatch(tokens: list[str]) -> tuple[list[str], bool]:
    """(problems, whether the command is an entry point of the project) for one command's tokens."""
    while tokens and re.match(r"[A-Za-z_]\w*=", tokens[0]):  # VAR=value command
        tokens = tokens[1:]
    if not tokens:
        return [], False
    program, args = tokens[0], tokens[1:]
    if program in WRAPPERS:  # srun [its options] accelerate launch ...: the command it runs
        inner = [i for i, t in enumerate(args) if re.fullmatch(PROGRAMS, t)]
        return dispatch(args[inner[0] :]) if inner else ([], False)
    if re.fullmatch(r"python(3(\.\d+)?)?", program):
        return check_python(args)
    if program == "accelerate":
        return check_accelerate(args)
    if program == "docker":
        return check_docker(args)
    if program.startswith("--"):
        return check_bare_overrides(tokens)
    return [], False


def check_command(command: Command) -> tuple[list[str], bool]:
    if command.tokens and command.tokens[0] == "<unparsable>":
        return [f"cannot split into words: {command.tokens[1]}"], False
    problems, entry = dispatch(command.tokens)
    if command.shell or entry:
        problems = path_problems(command) + problems
    return problems, entry


def check_markdown(text: str, name: str) -> tuple[list[str], int]:
    """(one line per problem, "FILE:LINE: `command`: what", the number of entry-point commands checked)."""
    problems: list[str] = []
    checked = 0
    for command in fenced_commands(text, name):
        found, entry = check_command(command)
        checked += entry
        problems += [f"{command.where()}: {p}" for p in dict.fromkeys(found)]
    return problems, checked


def docstring_commands(path: Path) -> list[Command]:
    """The usage lines of a script's module docstring: lines, or `spans`, that start with an entry point."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    if not (tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant)):
        return []
    lines = source.splitlines()
    name = str(path.relative_to(REPO))
    commands: list[Command] = []
    entry = r"(?:python3? (?:tools|train)/|python3? -m |accelerate launch )"
    number = tree.body[0].lineno
    while number <= tree.body[0].end_lineno:
        line = lines[number - 1].strip().strip('"')
        start = number
        for span in re.findall(rf"`({entry}[^`]*)`", line):
            commands += split_commands(span, name, start, shell=True)
        if re.match(entry, line):
            while line.endswith("\\") and number < tree.body[0].end_lineno:
                number += 1
                line = line[:-1] + " " + lines[number - 1].strip()
            commands += split_commands(line, name, start, shell=True)
        number += 1
    return commands


# ---------------------------------------------------------------------------------------------------- tests

DOC_FILES = ["README.md"] + sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md"))


@pytest.mark.parametrize("name", DOC_FILES)
def test_documented_commands_match_the_code(name):
    problems, checked = check_markdown((REPO / name).read_text(encoding="utf-8"), name)
    assert not problems, "commands that do not match the code:\n" + "\n".join(problems)
    if name == "README.md":  # the reader must have found the README's commands (it shows several entry points)
        assert checked >= 3, f"only {checked} entry-point commands recognised in README.md"


SCRIPTS = sorted(str(p.relative_to(REPO)) for folder in ("tools", "train") for p in (REPO / folder).glob("*.py"))
SCRIPTS.append("tools/profiling/cli.py")  # tools/profile.py's usage lines, kept beside its parser


def test_usage_lines_in_the_scripts_docstrings_match_the_code():
    problems, checked = [], 0
    for script in SCRIPTS:
        for command in docstring_commands(REPO / script):
            found, entry = check_command(command)
            checked += entry
            problems += [f"{command.where()}: {p}" for p in dict.fromkeys(found)]
    assert not problems, "usage lines that do not match the code:\n" + "\n".join(problems)
    assert checked >= 10, f"only {checked} usage lines recognised"  # make_shards, profile, linear_probe, ...


SAMPLE = """\
Text with `python tools/make_shards.py --not-checked` inline is not a fenced command.

```bash
# comments are not commands: python tools/make_shards.py --nope
python tools/make_shards.py --input SRC --output OUT [--workers N] [--shard-size BYTES]   # fine
python tools/make_shards.py --input SRC --output OUT --made-up-flag 3
accelerate launch train/pirl.py --config train/configs/imagenet_r50.yaml \\
    --data.shards=/data/... --optim.made_up_key=1
python train/pirl.py --config train/configs/no_such_recipe.yaml --print-config
cd /tmp && python tools/no_such_tool.py --x 1 | tee out.txt
python train/linear_probe.py --optim.lr=0.3 --train_shards=... --test_shards=...
python train/pirl.py --config ... --optim.epochs=ten
accelerate launch --config_file train/configs/accelerate/4nodes_8gpus.yaml --machine_rank $NODE_RANK \\
    --main_process_ip $MASTER_ADDR train/pirl.py --config train/configs/imagenet_r50.yaml --data.shards=/s
accelerate launch --made_up_launcher_flag train/pirl.py --data.shards=/s
accelerate launch -m pirl_trainer.train.pirl --data.shards=/s --optim.made_up=2
python tools/profile.py step --config CONFIG [--section.key=value ...] --steps 10 --json OUT.json
python tools/profile.py step --config train/configs/cpu_small.yaml --data.made_up=1
python tools/profile.py model --arch resnet18 --set 32:64:32
python -m tools.export --checkpoint A --output B
sbatch train/configs/slurm/no_such_job.sbatch
python tools/export.py --checkpoint runs/x/checkpoints/step_000000010.pt --output docs/no_such_folder/trunk.safetensors
srun --ntasks-per-node=1 accelerate launch train/pirl.py --config train/configs/imagenet_r50.yaml --run.made_up=1
```

```python
python tools/make_shards.py --this-is-python-not-shell
```

```
--data.recipe.image_size=112 --data.recipe.made_up_size=120
```
"""

# line of the SAMPLE -> a piece of the message that must name what is wrong there
EXPECTED = {
    6: "--made-up-flag",
    7: "made_up_key",
    9: "no_such_recipe.yaml",
    10: "tools/no_such_tool.py",
    11: "did you mean --lr?",  # linear_probe has no optim section: the message points at its own key
    12: "ten",
    15: "--made_up_launcher_flag",
    16: "optim.made_up",
    18: "data.made_up",
    19: "--set is an abbreviation of --setting",
    20: "pirl_trainer.tools.export",
    21: "train/configs/slurm/no_such_job.sbatch",
    22: "docs/no_such_folder/trunk.safetensors",
    23: "run.made_up",
    31: "made_up_size",
}


def test_the_checker_catches_made_up_flags_keys_and_paths():
    problems, checked = check_markdown(SAMPLE, "SAMPLE.md")
    by_line: dict[int, list[str]] = {}
    for problem in problems:
        by_line.setdefault(int(problem.split(":")[1]), []).append(problem)
    assert sorted(by_line) == sorted(EXPECTED), "\n".join(problems)
    for line, needle in EXPECTED.items():
        assert any(needle in p for p in by_line[line]), (line, needle, by_line[line])
    # lines 5, 13 and 17 are fine; the python block and the inline command are not read
    assert checked == 17


def test_continued_lines_and_chained_commands_split_where_the_shell_splits():
    text = "```sh\n$ A=1 python tools/export.py \\\n   --checkpoint c.pt --output o # note\necho x; ls && pwd\n```\n"
    commands = fenced_commands(text, "t.md")
    assert [(c.line, c.tokens) for c in commands] == [
        (2, ["A=1", "python", "tools/export.py", "--checkpoint", "c.pt", "--output", "o"]),
        (4, ["echo", "x"]), (4, ["ls"]), (4, ["pwd"]),
    ]


def test_docker_run_arguments_are_checked_as_the_entrypoint_receives_them(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "dockerfile_entrypoint",
                        lambda: ["accelerate", "launch", "train/pirl.py"])
    text = ("```bash\ndocker build -t pirl .\n"
            "docker run --rm --gpus all --ipc=host -v /data:/data -e X=1 pirl \\\n"
            "    --config train/configs/imagenet_r50.yaml --data.shards=/data/shards --data.backend=dali\n"
            "docker run --gpus all pirl --config train/configs/imagenet_r50.yaml --data.shardz=/data/shards\n```\n")
    problems, checked = check_markdown(text, "d.md")
    assert checked == 2 and len(problems) == 1
    assert problems[0].startswith("d.md:5:") and "--data.shardz" in problems[0]
