"""`easyref info`: what a model folder is, read from its files; and the bundled model's limits, which
`easyref generate` warns about."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys

import pytest
from conftest import shape_image
from PIL import Image
from safetensors import safe_open

from easyref import info
from easyref.cli import main

BUNDLED = info.BUNDLED_DIR


def run_info(capsys, *argv):
    code = main(["info", *argv])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def loaded_count(folder) -> int:
    """The parameters as safetensors itself reads them (the reference for the header-only count)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return total


def test_the_bundled_model_tells_its_size_vocabulary_and_parts(capsys):
    code, out, err = run_info(capsys)
    assert code == 0 and not err
    assert "the bundled default model" in out and "trained at: 64 x 64 px" in out
    vocabulary = next(line for line in out.splitlines() if "vocabulary (" in line)
    assert " blue " in vocabulary and " tan " in vocabulary and "<unk>" not in vocabulary
    assert "{white|black|gray|tan} background" in out
    for title in ("SDXL base:", "Qwen2-VL (MLLM):", "EasyRef adapter:", "total:"):
        assert title in out
    assert run_info(capsys, "default")[1] == out


@pytest.mark.parametrize(
    "part, title", [("adapter", "EasyRef adapter:"), ("sdxl", "SDXL base:"), ("qwen2vl", "Qwen2-VL (MLLM):")]
)
def test_each_part_alone(capsys, part, title):
    code, out, _ = run_info(capsys, str(BUNDLED / part))
    assert code == 0 and out.startswith(title)


def test_parameter_counts_match_the_weights():
    for folder in (BUNDLED / "adapter", BUNDLED / "qwen2vl", BUNDLED / "sdxl" / "unet"):
        assert sum(info.parameter_counts(folder).values()) == loaded_count(folder)


def test_a_hub_folder_with_fp16_variants_is_counted_once(tmp_path):
    unet = tmp_path / "unet"
    shutil.copytree(BUNDLED / "sdxl" / "unet", unet)
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.fp16.safetensors")
    assert sum(info.parameter_counts(unet).values()) == loaded_count(BUNDLED / "sdxl" / "unet")


def _damaged_weights(tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(BUNDLED / "adapter", folder)
    (folder / "easyref.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    return folder


@pytest.mark.parametrize(
    "case, phrase",
    [
        ("missing", "no such folder"),
        ("a file", "is a file"),
        ("not a model", "is not a model folder"),
        ("damaged config", "not valid JSON"),
        ("damaged weights", "damaged header"),
    ],
)
def test_anything_else_is_one_line_exit_2(tmp_path, capsys, case, phrase):
    target = {
        "missing": lambda: tmp_path / "nope",
        "a file": lambda: BUNDLED / "recipe.json",
        "not a model": lambda: tmp_path,
        "damaged weights": lambda: _damaged_weights(tmp_path),
    }.get(case)
    if case == "damaged config":
        (tmp_path / "model_index.json").write_text("{")
        target = lambda: tmp_path  # noqa: E731
    code, out, err = run_info(capsys, str(target()))
    assert code == 2 and not out
    assert len(err.splitlines()) == 1 and err.startswith("easyref: error:") and phrase in err, err


def test_info_imports_neither_torch_nor_numpy():
    script = (
        "import sys; from easyref.cli import main; main(['info']); print(sorted(m for m in ('torch', 'numpy', "
        "'diffusers', 'transformers') if m in sys.modules), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "[]", result.stderr


def test_unknown_words_split_like_the_word_level_tokenizer():
    words = info.vocabulary(BUNDLED / "sdxl")
    assert info.unknown_words("an object on a Blue background, at the top-left!", words) == ["Blue", "-", "!"]
    assert info.vocabulary(BUNDLED / "qwen2vl") is None  # no tokenizer/ there: nothing to say


def test_generate_warns_about_the_bundled_models_limits(tmp_path, caplog):
    shape_image("red").save(tmp_path / "ref.png")
    argv = [
        "generate",
        "--ref",
        str(tmp_path / "ref.png"),
        "--prompt",
        "an object on a blue background, at the Top left",
        "--out",
        str(tmp_path / "out.png"),
        "--steps",
        "1",
        "--seed",
        "0",
        "--height",
        "72",
    ]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("do not know 'Top'" in w for w in warnings)
    assert any("trained at 64 x 64 px only; at 64 x 72 px" in w for w in warnings)
    assert any("'blue background' will come out as one of them" in w for w in warnings)
    assert not any("'blue'" in w for w in warnings)  # it knows the word: the background is what it never saw
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (64, 72) and json.loads(image.text["easyref"])["height"] == 72


def test_the_bundled_models_prompt_templates_cover_every_prompt_it_was_trained_on():
    import itertools
    import re

    from easyref.info import trained_prompts
    from easyref.shapes.world import make_groups

    def expand(template: str) -> set[str]:
        parts = re.split(r"\{([^}]*)\}", template)  # odd parts are the choices
        options = [part.split("|") if i % 2 else [part] for i, part in enumerate(parts)]
        return {"".join(choice) for choice in itertools.product(*options)}

    known = expand(trained_prompts())
    prompts = {g.prompt for g in make_groups("held-in", 60, 3, 1, seed=3)}  # its stage 3 saw plain groups only
    assert len(prompts) > 15 and prompts <= known, sorted(prompts - known)[:3]
    assert not {g.prompt for g in make_groups("held-in", 20, 3, 0, seed=3, kind="pick")} & known
