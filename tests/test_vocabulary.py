"""Every prompt the project ships or prints uses only words the bundled model knows.

The bundled model's text encoders are word-level: a word outside their 35 (`easyref info` lists them) reads
as an unknown token, and `easyref generate` warns about it. So no prompt we hand a user may hold one.
Collected, each with where it comes from:

- the Makefile: every `--prompt VALUE` (continuation lines joined);
- the README: the `--prompt` values of its `easyref ...` commands, as tests/test_readme.py reads them (bash
  blocks and inline code spans), and in its python blocks the prompts of `pipe(...)` calls (the second
  positional argument, or `prompt=`/`negative_prompt=`) in the blocks that use the bundled model (a block
  that loads another adapter, the authors' release say, speaks that model's language); placeholders (`...`)
  are skipped;
- `easyref train --write-example-data`: every caption of the example data (pairs, faces, groups);
- the command the trainer prints at the end of each example stage (`trainer.generate_command`);
- `easyref.shapes.data`: the demo's prompts (`demo_examples`, `demo_prompts`), which `make demo`, the
  README's pictures and the web page's examples row use;
- what easyref prints about the bundled model: the quoted example in its notice, and the trained-prompt
  template `easyref info` prints, expanded;
- `--help`: every `--prompt VALUE` in a parser's description, epilog or option help.

Words are split as the bundled tokenizers split them (`info.unknown_words`, checked against the tokenizers
themselves through `generation._warn_about_words` below): case and punctuation count.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import logging
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_readme import readme_commands

from easyref.bundled import BUNDLED_DIR, NOTICE, trained_prompts
from easyref.cli import build_parser
from easyref.info import unknown_words, vocabulary

ROOT = Path(__file__).resolve().parents[1]
WORDS = vocabulary(BUNDLED_DIR / "sdxl")
PROMPT_FLAG = re.compile(r"--prompt\s+(\"[^\"]*\"|'[^']*'|\S+)")


def is_placeholder(prompt: str) -> bool:
    return not prompt.strip(". ")


def line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


# ---------------------------------------------------------------------- where prompts come from
def makefile_prompts() -> list[tuple[str, str]]:
    text = (ROOT / "Makefile").read_text()
    joined = text.replace("\\\n", " \n")  # a continued command keeps its line count
    return [
        (f"Makefile:{line_of(joined, m.start())}", shlex.split(m.group(1))[0]) for m in PROMPT_FLAG.finditer(joined)
    ]


def readme_command_prompts() -> list[tuple[str, str]]:
    found = []
    for words in readme_commands((ROOT / "README.md").read_text()):
        for flag, value in zip(words, words[1:]):
            if flag == "--prompt" and not is_placeholder(value):
                found.append((f"README.md: {shlex.join(words)}", value))
    return found


def readme_python_prompts() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.finditer(r"```python\n(.*?)```", text, re.S):
        if "adapter=" in block.group(1):
            continue
        for node in ast.walk(ast.parse(block.group(1))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pipe":
                where = f"README.md:{line_of(text, block.start(1)) + node.lineno - 1}"
                found += [(where, prompt) for prompt in _call_prompts(node) if not is_placeholder(prompt)]
    return found


def _call_prompts(call: ast.Call) -> list[str]:
    """`pipe(references, prompt, ...)`: the prompt argument and the prompt keywords, strings or lists of them."""
    nodes = call.args[1:2] + [k.value for k in call.keywords if k.arg in ("prompt", "negative_prompt")]
    strings = []
    for node in nodes:
        items = node.elts if isinstance(node, (ast.List, ast.Tuple)) else [node]
        strings += [item.value for item in items if isinstance(item, ast.Constant) and isinstance(item.value, str)]
    return strings


@pytest.fixture(scope="module")
def example_data(tmp_path_factory):
    from easyref.train.example import write_example_data

    return write_example_data(tmp_path_factory.mktemp("example") / "runs" / "example-data")


def example_data_prompts(paths: dict[str, Path]) -> list[tuple[str, str]]:
    from easyref.train.data import load_records

    found = []
    for path in paths.values():
        for i, record in enumerate(load_records(path)):
            texts = record["text"] if isinstance(record["text"], list) else [record["text"]]
            found += [(f"example data {path.name} record {i}", text) for text in texts]
    return found


def trainer_command_prompts(paths: dict[str, Path]) -> list[tuple[str, str]]:
    """The command each example stage prints, built from its recipe and its data's first record."""
    from easyref.train.config import load_config, recipe_path
    from easyref.train.data import load_records
    from easyref.train.trainer import generate_command

    found = []
    for stage in (1, 2, 3):
        config = load_config(recipe_path(f"example-stage{stage}"))
        first = load_records(paths[{1: "pairs", 2: "faces", 3: "groups"}[stage]])[0]
        words = shlex.split(generate_command(Path(config.output_dir) / "final", config, first))
        found.append((f"trainer's command after example-stage{stage}", words[words.index("--prompt") + 1]))
    return found


def demo_prompts_shipped() -> list[tuple[str, str]]:
    from easyref.shapes.data import demo_examples, demo_group, demo_prompts

    found = [(f"shapes.data demo_examples() {e.name}", p) for e in demo_examples() for p in e.prompts]
    return found + [("shapes.data demo_prompts(demo_group())", p) for p in demo_prompts(demo_group())]


def printed_about_the_bundled_model() -> list[tuple[str, str]]:
    found = [("bundled.NOTICE", quoted) for quoted in re.findall(r"'([^']+)'", NOTICE)]
    return found + [("easyref info: trained prompts", p) for p in expand(trained_prompts())]


def expand(template: str) -> list[str]:
    """`an object on a {white|black} background` -> each choice spelled out."""
    pieces = re.split(r"\{([^}]*)\}", template)
    choices = [[p] if i % 2 == 0 else p.split("|") for i, p in enumerate(pieces)]
    return ["".join(parts) for parts in itertools.product(*choices)]


def help_prompts() -> list[tuple[str, str]]:
    found = []
    for parser in all_parsers(build_parser()):
        texts = [parser.description, parser.epilog] + [action.help for action in parser._actions]
        for text in filter(None, texts):
            found += [(f"{parser.prog} --help", shlex.split(m.group(1))[0]) for m in PROMPT_FLAG.finditer(text)]
    return found


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    children = [
        child
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for child in {id(c): c for c in action.choices.values()}.values()
    ]
    return [parser] + [p for child in children for p in all_parsers(child)]


@pytest.fixture(scope="module")
def shipped(example_data):
    return {
        "Makefile": makefile_prompts(),
        "README commands": readme_command_prompts(),
        "README python": readme_python_prompts(),
        "example data": example_data_prompts(example_data),
        "trainer's command": trainer_command_prompts(example_data),
        "demo": demo_prompts_shipped(),
        "bundled model notes": printed_about_the_bundled_model(),
        "--help": help_prompts(),
    }


# ---------------------------------------------------------------------- the checks
def test_the_vocabulary_is_the_bundled_models():
    assert len(WORDS) == 35 and {"an", "object", "background", ","} <= set(WORDS)


def test_every_source_is_found(shipped):
    """The extraction finds what is there (a test that reads nothing passes on anything)."""
    empty = [source for source, prompts in shipped.items() if not prompts and source != "--help"]
    assert not empty, empty
    assert len(shipped["trainer's command"]) == 3 and len(shipped["demo"]) >= 4


@pytest.mark.parametrize(
    "source",
    [
        "Makefile",
        "README commands",
        "README python",
        "example data",
        "trainer's command",
        "demo",
        "bundled model notes",
        "--help",
    ],
)
def test_shipped_prompts_use_only_words_the_bundled_model_knows(shipped, source):
    bad = [
        f"{where}: {prompt!r} -> {unknown}"
        for where, prompt in shipped[source]
        if (unknown := unknown_words(prompt, WORDS))
    ]
    assert not bad, "prompts with words the bundled model does not know:\n" + "\n".join(bad)


def test_the_word_split_is_the_tokenizers(shipped, caplog):
    """`info.unknown_words` finds exactly the words `easyref generate` warns about (`_warn_about_words`, on the
    bundled model's own tokenizers), on every collected prompt and on a few that hold unknown words."""
    from transformers import AutoTokenizer

    from easyref.generation import _warn_about_words

    sdxl = BUNDLED_DIR / "sdxl"
    pipe = SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(sdxl / "tokenizer"),
        tokenizer_2=AutoTokenizer.from_pretrained(sdxl / "tokenizer_2"),
    )
    prompts = {prompt for found in shipped.values() for _, prompt in found}
    prompts |= {"A red star", "a picture", "a red circle on a lavender background", "a star, at the top-left."}
    for prompt in sorted(prompts):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="easyref"):
            _warn_about_words(pipe, prompt, bundled=True)
        listed = re.search(r"do not know (.*) \(read as unknown tokens\)", caplog.text)
        warned = ast.literal_eval(f"[{listed.group(1)}]") if listed else []
        assert warned == unknown_words(prompt, WORDS), (prompt, caplog.text)


def test_the_example_data_keeps_its_shape(example_data):
    """The captions name what is drawn (colour, shape, background); stage 3's prompts ask for the target's
    background and leave the subject to the references, as the shapes world's do."""
    pairs = json.loads(example_data["pairs"].read_text())
    groups = [json.loads(line) for line in example_data["groups"].read_text().splitlines()]
    assert re.fullmatch(r"a \w+ (circle|square|triangle) on a (white|gray|tan|black) background", pairs[0]["text"][0])
    by_target = {p["target"]: p["text"][0] for p in pairs}
    for group in groups:
        background = by_target[group["target"]].split(" on a ")[1]
        assert group["text"] == [f"an object on a {background}"] and group["target"] not in group["image_file"]
