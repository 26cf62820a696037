"""The training commands docs/results.md and the README quote resolve to the settings the docs state.

Every `python -m experiments.train ...` line in a bash block must parse and validate (a renamed flag or a stale
preset fails here, not in a reader's terminal). A yaml block that opens with `# protocol: NAME` states the settings
of the result it precedes; each training command of the next bash block must resolve to exactly those values."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from experiments import config as cfg

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "results.md", ROOT / "docs" / "guide.md", ROOT / "README.md"]


def train_commands(block: str) -> list[list[str]]:
    """The argv of each `python -m experiments.train` line (continuations joined, shell loops' $vars -> 0)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        match = re.search(r"python -m experiments\.train\s+(.*)", line)
        if match and "--resume" not in match.group(1):
            lexer = shlex.shlex(
                re.sub(r"\$\{?\w+\}?", "0", match.group(1)), posix=True, punctuation_chars=";&|"
            )
            lexer.whitespace_split, lexer.commenters = True, "#"
            argv = []
            for token in lexer:  # the command ends at a shell separator outside quotes (`; done`, `&&`)
                if token in (";", "&&", "||", "|", "&"):
                    break
                argv.append(token)
            commands.append(argv)
    return commands


def blocks(path: Path) -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", path.read_text(), flags=re.S)


def protocol_cases() -> list[tuple[str, dict, list[str]]]:
    """(protocol name, its settings, a command quoted under it) for every protocol block of the docs."""
    cases, current = [], None
    for path in DOCS:
        for kind, text in blocks(path):
            if kind == "yaml" and text.startswith("# protocol:"):
                name = text.splitlines()[0].split(":", 1)[1].strip()
                current = (name, yaml.safe_load(text))
            elif kind == "bash" and current is not None:
                cases += [(current[0], current[1], argv) for argv in train_commands(text)]
                current = None
    return cases


def all_commands() -> list[list[str]]:
    return [
        argv
        for path in DOCS
        for kind, text in blocks(path)
        if kind == "bash"
        for argv in train_commands(text)
    ]


def resolved(argv: list[str]) -> cfg.TrainConfig:
    return cfg.resolve(cfg.build_parser("docs").parse_args(argv))


def flat(config: cfg.TrainConfig) -> dict:
    values = config.to_dict()
    for name in ("perceiver", "algo", "policy"):
        values.update({f"{name}.{k}": v for k, v in values.pop(name).items()})
    return values


def test_the_docs_state_protocols_and_quote_their_commands():
    names = {name for name, _, _ in protocol_cases()}
    assert {"pixels-drq"} <= names


@pytest.mark.parametrize("argv", all_commands(), ids=lambda argv: " ".join(argv)[:80])
def test_every_quoted_training_command_resolves(argv):
    resolved(argv)


@pytest.mark.parametrize(
    "name,settings,argv", protocol_cases(), ids=lambda v: " ".join(v)[:80] if isinstance(v, list) else None
)
def test_quoted_commands_resolve_to_their_documented_protocol(name, settings, argv):
    values = flat(resolved(argv))
    wrong = {k: (v, values.get(k)) for k, v in settings.items() if values.get(k) != v}
    assert not wrong, f"protocol {name}: documented vs resolved {wrong} for {' '.join(argv)}"
