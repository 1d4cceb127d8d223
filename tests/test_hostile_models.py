"""Model folders, model names and devices made to break easyref: each is one `easyref: error:` line (exit 2)
or a description that shows what it cannot trust as '?'. Nothing is loaded, unpickled, imported or run
from a folder, and `info` reads nothing outside the folder it is given."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import shape_image
from PIL import Image, PngImagePlugin

from easyref import devices, info
from easyref.bundled import BUNDLED_DIR
from easyref.cli import main
from easyref.devices import DeviceError, check_device_name, resolve_device
from easyref.pipeline import EasyRefPipeline
from easyref.resolve import ResolveError, resolve, resolve_parts

NO_USER = "~nosuchuser_easyref_test"
LONG_NAMES = ["a" * 300, "x/" + "a" * 300]


# ---------------------------------------------------------------------- small model folders, from scratch
def safetensors_bytes(shapes: dict[str, list[int]], data_bytes: int | None = None) -> bytes:
    """A float32 safetensors file whose header declares `shapes`; `data_bytes` overrides what follows it."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape) if data_bytes is None else data_bytes
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * (offset if data_bytes is None else data_bytes)


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def make_mllm(folder: Path) -> Path:
    write_json(
        folder / "config.json",
        {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "text_config": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 263},
            "vision_config": {"depth": 3, "embed_dim": 64, "patch_size": 14, "spatial_merge_size": 2},
        },
    )
    write_json(folder / "training.json", {"steps": 10, "final_loss": 0.5})
    (folder / "model.safetensors").write_bytes(safetensors_bytes({"lm_head.weight": [4, 4]}))
    return folder


def make_sdxl(folder: Path) -> Path:
    write_json(
        folder / "model_index.json",
        {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    write_json(folder / "unet" / "config.json", {"sample_size": 16})
    write_json(folder / "vae" / "config.json", {"block_out_channels": [16, 32, 64]})
    write_json(folder / "tokenizer" / "tokenizer.json", {"model": {"type": "WordLevel", "vocab": {"red": 0, "a": 1}}})
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(safetensors_bytes({"conv.weight": [3, 5]}))
    return folder


def make_adapter(folder: Path) -> Path:
    write_json(
        folder / "easyref_config.json",
        {
            "version": 1,
            "base": "sdxl",
            "mllm": "qwen2vl",
            "num_reference_tokens": 64,
            "reference_image_size": 112,
            "max_references": 28,
            "reference_mode": "joint",
            "attention_mode": "official",
            "has_trunk": False,
            "lora_rank": 8,
            "mllm_hidden_size": 64,
            "cross_attention_dim": 64,
        },
    )
    (folder / "easyref.safetensors").write_bytes(safetensors_bytes({"aggregator.tokens": [2, 8]}))
    return folder


def make_set(folder: Path) -> Path:
    make_sdxl(folder / "sdxl")
    make_mllm(folder / "qwen2vl")
    make_adapter(folder / "adapter")
    write_json(folder / "recipe.json", {"recipe": {"seed": 0, "groups": 10}})
    return folder


MAKERS = {"mllm": make_mllm, "sdxl": make_sdxl, "adapter": make_adapter, "set": make_set}


def run_info(capsys, target) -> tuple[int, str, str]:
    code = main(["info", str(target)])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def assert_one_error_line(code: int, out: str, err: str, phrase: str) -> None:
    assert code == 2 and not out, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("easyref: error:") and phrase in lines[0], err


# ---------------------------------------------------------------------- info: values of the wrong type
def _set(file: str, *keys_and_value):
    """A change that sets file[key1][key2]... = value (the whole file when no key is given)."""
    *keys, value = keys_and_value

    def change(folder: Path) -> None:
        path = folder / file
        if not keys:
            path.write_text(value if isinstance(value, str) else json.dumps(value))
            return
        data = json.loads(path.read_text())
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
        path.write_text(json.dumps(data))

    return change


# (kind, change, expected): ("error", phrase) is one error line; ("shows", text) / ("omits", text) an exit 0
WRONG_TYPES = {
    "text_config a number": ("mllm", _set("config.json", "text_config", 5), ("shows", "hidden size ?, ? layers")),
    "architectures a string": ("mllm", _set("config.json", "architectures", "x"), ("shows", "(x, qwen2_vl)")),
    "architectures numbers": ("mllm", _set("config.json", "architectures", [1, 2]), ("shows", "(?, qwen2_vl)")),
    "architectures with escapes": (
        "mllm",
        _set("config.json", "architectures", ["\x1b[31mRed\nLine"]),
        ("shows", "(\\x1b[31mRed\\nLine, qwen2_vl)"),
    ),
    "model_type a list": ("mllm", _set("config.json", "model_type", ["qwen2_vl"]), ("error", "not a model folder")),
    "config.json a list": ("mllm", _set("config.json", [1]), ("error", "not a JSON object")),
    "config.json a huge integer": ("mllm", _set("config.json", '{"x": ' + "9" * 5000 + "}"), ("error", "config.json")),
    "hidden size a bool": ("mllm", _set("config.json", "text_config", "hidden_size", True), ("shows", "hidden size ?")),
    "vision values of other types": (
        "mllm",
        _set("config.json", "vision_config", {"depth": "deep", "patch_size": {}, "spatial_merge_size": [2]}),
        ("shows", "vision: depth ?, width ?, patch ? px merged ?x?"),
    ),
    "training steps a mapping": ("mllm", _set("training.json", "steps", {"a": 1}), ("shows", '{"a": 1} steps')),
    "training loss past float": ("mllm", _set("training.json", "final_loss", 10**400), ("omits", "final loss")),
    "training.json a list": ("mllm", _set("training.json", [1]), ("error", "not a JSON object")),
    "_class_name a list": ("sdxl", _set("model_index.json", "_class_name", []), ("shows", "(?, diffusers 0.42.1)")),
    "scheduler of other types": ("sdxl", _set("model_index.json", "scheduler", [1, {}]), ("shows", "scheduler: ?")),
    "component class a number": (
        "sdxl",
        _set("model_index.json", "unet", ["diffusers", 7]),
        ("shows", "    unet            ? "),
    ),
    "diffusers version a number": ("sdxl", _set("model_index.json", "_diffusers_version", 5), ("shows", "diffusers ?")),
    "model_index.json a list": ("sdxl", _set("model_index.json", []), ("error", "not a JSON object")),
    "sample_size a mapping": ("sdxl", _set("unet/config.json", "sample_size", {"h": 1}), ("omits", "native size")),
    "sample_size astronomical": ("sdxl", _set("unet/config.json", "sample_size", 10**300), ("omits", "native size")),
    "block_out_channels text": ("sdxl", _set("vae/config.json", "block_out_channels", ["a", "b"]), ("omits", "native")),
    "unet config a list": ("sdxl", _set("unet/config.json", [1]), ("omits", "native size")),
    "tokenizer model a list": ("sdxl", _set("tokenizer/tokenizer.json", "model", [1]), ("shows", "tokenizers: ?, ?")),
    "vocab a list": (
        "sdxl",
        _set("tokenizer/tokenizer.json", "model", {"type": "WordLevel", "vocab": [1, 2]}),
        ("shows", "tokenizers: WordLevel, 2 tokens"),
    ),
    "vocab words with newlines": (
        "set",
        _set("sdxl/tokenizer/tokenizer.json", "model", "vocab", {"re\nd": 0}),
        ("shows", "vocabulary (1 words; any other word reads as unknown): re\\nd"),
    ),
    "adapter version a mapping": ("adapter", _set("easyref_config.json", "version", {}), ("shows", "version {})")),
    "adapter names not text": (
        "adapter",
        _set("easyref_config.json", "base", ["x"]),
        ("shows", "made with: base ?, mllm qwen2vl"),
    ),
    "adapter tokens past belief": (
        "adapter",
        _set("easyref_config.json", "num_reference_tokens", 10**400),
        ("shows", "reference tokens ?,"),
    ),
    "adapter width 16 digits": (
        "adapter",
        _set("easyref_config.json", "cross_attention_dim", -(10**15) - 1),
        ("shows", "cross-attention ?"),
    ),
    "adapter version huge in a list": (
        "adapter",
        _set("easyref_config.json", "version", [10**400, 2]),
        ("shows", "version [?, 2])"),
    ),
    "training steps huge": ("mllm", _set("training.json", "steps", 10**20), ("shows", ": ? steps")),
    "adapter tokens text": (
        "adapter",
        _set("easyref_config.json", "num_reference_tokens", "many"),
        ("shows", "reference tokens ?,"),
    ),
    "has_trunk the text false": ("adapter", _set("easyref_config.json", "has_trunk", "false"), ("shows", "trunk: no")),
    "recipe values of other types": (
        "set",
        _set("recipe.json", "recipe", {"seed": {"x": [1]}, "groups": "a\nb"}),
        ("shows", 'recipe (recipe.json): groups a\\nb, seed {"x": [1]}'),
    ),
    "recipe a number": ("set", _set("recipe.json", "recipe", 5), ("omits", "recipe (")),
    "recipe.json a list": ("set", _set("recipe.json", []), ("error", "not a JSON object")),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_info_never_trusts_a_type(tmp_path, capsys, case):
    kind, change, (outcome, text) = WRONG_TYPES[case]
    folder = MAKERS[kind](tmp_path / "model")
    change(folder)
    code, out, err = run_info(capsys, folder)
    if outcome == "error":
        assert_one_error_line(code, out, err, text)
        return
    assert code == 0 and not err, err
    assert (text in out) == (outcome == "shows"), out
    assert all(line.isprintable() for line in out.splitlines()), out


def test_info_describes_the_intact_folders(tmp_path, capsys):
    """The builders above make folders info describes in full (so each case above changes one thing)."""
    for kind, make in MAKERS.items():
        code, out, err = run_info(capsys, make(tmp_path / kind))
        assert code == 0 and not err and "?" not in out, out
    assert "native size: 64 x 64 px" in run_info(capsys, tmp_path / "sdxl")[1]


# ---------------------------------------------------------------------- info: never outside the folder
@pytest.mark.parametrize("name", ["/", "../outside", "a/b", ".."])
def test_a_component_that_is_not_a_plain_name_is_refused(tmp_path, capsys, monkeypatch, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.safetensors").write_bytes(safetensors_bytes({"w": [100, 100]}))
    folder = make_sdxl(tmp_path / "model")
    _set("model_index.json", name, ["diffusers", "UNet2DConditionModel"])(folder)
    listed = []
    real_entries = info._entries
    monkeypatch.setattr(info, "_entries", lambda path: listed.append(Path(path)) or real_entries(path))
    code, out, err = run_info(capsys, folder)
    assert_one_error_line(code, out, err, "not a plain folder name")
    assert all(path.resolve().is_relative_to(folder.resolve()) for path in listed), listed


def test_links_out_of_the_folder_are_not_followed(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(safetensors_bytes({"w": [1000, 1000]}))
    folder = make_sdxl(tmp_path / "model")
    shutil.rmtree(folder / "vae")
    (folder / "vae").symlink_to(outside, target_is_directory=True)
    (folder / "unet" / "more.safetensors").symlink_to(outside / "model.safetensors")
    code, out, err = run_info(capsys, folder)
    assert code == 0 and not err
    assert "a link out of" in next(line for line in out.splitlines() if line.strip().startswith("vae"))
    assert "15 params" in out and "total: 15 parameters" in out  # the unet's own 3 x 5, never the 10**6 outside


def test_a_set_whose_part_links_to_the_root_of_the_file_system(tmp_path, capsys, monkeypatch):
    folder = make_set(tmp_path / "model")
    shutil.rmtree(folder / "qwen2vl")
    (folder / "qwen2vl").symlink_to("/", target_is_directory=True)
    listed = []
    real_entries = info._entries
    monkeypatch.setattr(info, "_entries", lambda path: listed.append(Path(path)) or real_entries(path))
    code, out, err = run_info(capsys, folder)
    assert code == 0 and not err and f"{folder / 'qwen2vl'}: a link out of" in out
    assert all(path.resolve().is_relative_to(folder.resolve()) for path in listed), listed


def test_a_hub_snapshot_counts_the_blobs_its_files_link_to(tmp_path, capsys):
    """In the Hugging Face cache every file links to ../../blobs/: the repository folder is the bound."""
    repo = tmp_path / "models--owner--name"
    snapshot = make_mllm(repo / "snapshots" / "0123abcd")
    (repo / "blobs").mkdir()
    os.replace(snapshot / "model.safetensors", repo / "blobs" / "f00d")
    (snapshot / "model.safetensors").symlink_to("../../blobs/f00d")
    code, out, err = run_info(capsys, snapshot)
    assert code == 0 and "parameters: 16 params" in out, out + err


@pytest.mark.parametrize("shape", [[10**200, 10**200], [2**40, 2**40, 2**40], [1] * 10 + [10**30]])
def test_a_header_declaring_more_than_the_file_holds_is_damaged(tmp_path, capsys, shape):
    folder = make_adapter(tmp_path / "adapter")
    (folder / "easyref.safetensors").write_bytes(safetensors_bytes({"aggregator.tokens": shape}, data_bytes=16))
    code, out, err = run_info(capsys, folder)
    assert_one_error_line(code, out, err, "easyref.safetensors: tensor aggregator.tokens declares more elements")


def test_a_header_within_the_file_is_counted(tmp_path):
    """Sub-byte dtypes pack elements: 32 F4 values fill 16 bytes exactly, 31 or 33 do not."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw_safetensors({"bits": tensor("F4", [32], [0, 16])}, data_bytes=16))
    assert info.tensor_shapes(path) == {"bits": ("F4", [32])}
    for shape, phrase in (([33], "declares more elements"), ([31], "not what its shape and dtype need")):
        path.write_bytes(raw_safetensors({"bits": tensor("F4", shape, [0, 16])}, data_bytes=16))
        with pytest.raises(info.NotAModelError, match=phrase):
            info.tensor_shapes(path)


def tensor(dtype, shape, offsets) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def raw_safetensors(header: dict, data_bytes: int) -> bytes:
    """A safetensors file of exactly this header, followed by `data_bytes` zero bytes."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes


# (header, data bytes, phrase of the one error line); each breaks one rule of the safetensors format
DAMAGED_HEADERS = {
    "unknown dtype": ({"w": tensor("Q8", [4], [0, 4])}, 4, "tensor w has unknown dtype Q8"),
    "dtype not text": ({"w": tensor(["F32"], [1], [0, 4])}, 4, "tensor w has unknown dtype"),
    "negative offset": ({"w": tensor("U8", [4], [-8, 4])}, 4, "tensor w has data_offsets [-8, 4], not within"),
    "offsets past the file": ({"w": tensor("U8", [4], [0, 2**80])}, 4, "tensor w has data_offsets [0, ?]"),
    "offsets reversed": ({"w": tensor("U8", [0], [4, 0])}, 4, "tensor w has data_offsets [4, 0]"),
    "one offset": ({"w": tensor("U8", [4], [0])}, 4, "tensor w has data_offsets [0]"),
    "three offsets": ({"w": tensor("U8", [4], [0, 2, 4])}, 4, "tensor w has data_offsets"),
    "offsets not ints": ({"w": tensor("U8", [4], [0, 4.0])}, 4, "tensor w has data_offsets [0, 4.0]"),
    "offsets bools": ({"w": tensor("U8", [1], [False, True])}, 1, "tensor w has data_offsets"),
    "no offsets": ({"w": {"dtype": "U8", "shape": [4]}}, 4, "tensor w has data_offsets ?"),
    "fewer bytes than the shape": ({"w": tensor("F32", [4], [0, 8])}, 8, "tensor w declares more elements"),
    "more bytes than the shape": ({"w": tensor("F32", [2], [0, 16])}, 16, "tensor w takes 16 bytes, not what"),
    "overlapping": (
        {"a": tensor("U8", [4], [0, 4]), "b": tensor("U8", [4], [2, 6])},
        6,
        "tensor b starts at byte 2 of the data, not 4",
    ),
    "the same bytes twice": (
        {"a": tensor("U8", [4], [0, 4]), "b": tensor("U8", [4], [0, 4])},
        4,
        "tensor b starts at byte 0 of the data, not 4",
    ),
    "a gap": ({"a": tensor("U8", [4], [0, 4]), "b": tensor("U8", [4], [6, 10])}, 10, "tensor b starts at byte 6"),
    "not from the start": ({"w": tensor("U8", [4], [4, 8])}, 8, "tensor w starts at byte 4 of the data, not 0"),
    "a tail no tensor declares": ({"w": tensor("U8", [4], [0, 4])}, 12, "the tensors cover 4 of the file's 12 bytes"),
    "metadata not text": (
        {"__metadata__": {"format": 1}, "w": tensor("U8", [4], [0, 4])},
        4,
        "__metadata__ is not a mapping of text to text",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED_HEADERS))
def test_a_header_the_safetensors_format_refuses_is_damaged(tmp_path, capsys, case):
    header, data_bytes, phrase = DAMAGED_HEADERS[case]
    folder = make_adapter(tmp_path / "adapter")
    (folder / "easyref.safetensors").write_bytes(raw_safetensors(header, data_bytes))
    code, out, err = run_info(capsys, folder)
    assert_one_error_line(code, out, err, f"easyref.safetensors: {phrase}")
    assert "damaged header" in err


def test_safetensors_itself_refuses_the_damaged_headers(tmp_path):
    """The cases above are damaged by the format's own reader too (so info refuses no valid file)."""
    from safetensors import SafetensorError, safe_open

    for case, (header, data_bytes, _) in DAMAGED_HEADERS.items():
        path = tmp_path / "x.safetensors"
        path.write_bytes(raw_safetensors(header, data_bytes))
        with pytest.raises(SafetensorError):
            with safe_open(str(path), framework="pt") as handle:
                list(handle.keys())
            pytest.fail(case)


def test_a_header_of_every_dtype_laid_out_right_is_counted(tmp_path, capsys):
    """Tensors in any order of names, of every dtype (sub-byte ones too), an empty tensor, metadata: counted,
    and safetensors reads the same file."""
    from safetensors import safe_open

    header, at = {"__metadata__": {"format": "pt"}}, 0
    for dtype, bits in reversed(info.DTYPE_BITS.items()):
        nbytes = 2 * bits  # 16 elements
        header[dtype.lower()] = tensor(dtype, [4, 4], [at, at + nbytes])
        at += nbytes
    header["empty"] = tensor("F32", [3, 0], [at, at])
    folder = make_adapter(tmp_path / "adapter")
    (folder / "easyref.safetensors").write_bytes(raw_safetensors(header, at))
    with safe_open(str(folder / "easyref.safetensors"), framework="numpy") as handle:
        assert set(handle.keys()) == set(header) - {"__metadata__"}
    code, out, err = run_info(capsys, folder)
    assert code == 0 and not err, err
    assert f"parameters: {16 * len(info.DTYPE_BITS)} params" in out, out


# ---------------------------------------------------------------------- model names
def _generate_argv(tmp_path: Path, *flags: str) -> list[str]:
    ref = tmp_path / "ref.png"
    shape_image("red").save(ref)
    return ["generate", "--ref", str(ref), "--prompt", "a red circle", "--out", str(tmp_path / "o.png"), *flags]


@pytest.fixture
def no_model_load(monkeypatch):
    """The refusal must come before any model loads: loading fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(EasyRefPipeline, "from_parts", refuse)


@pytest.mark.parametrize("flag", ["--base", "--mllm", "--adapter", "info", "convert"])
@pytest.mark.parametrize("name", [f"{NO_USER}/x", *LONG_NAMES], ids=["unknown user", "long name", "long part"])
def test_names_no_file_system_can_hold_are_one_line(tmp_path, capsys, no_model_load, flag, name):
    if flag == "info":
        argv = ["info", name]
    elif flag == "convert":
        argv = ["convert", name, str(tmp_path / "dst")]
    else:
        argv = _generate_argv(tmp_path, flag, name)
    code = main(argv)
    out, err = capsys.readouterr()
    phrase = f"{NO_USER}: no such user" if name.startswith("~") else "longer than 255 bytes"
    assert_one_error_line(code, out, err.strip(), phrase)


def test_resolve_names_the_unknown_user_and_the_long_part():
    with pytest.raises(ResolveError, match=f"^--base {NO_USER}/x: {NO_USER}: no such user$"):
        resolve(f"{NO_USER}/x", "base", label=f"--base {NO_USER}/x")
    with pytest.raises(ResolveError, match="longer than 255 bytes"):
        resolve("x/" + "é" * 128, "mllm")  # 128 characters, 256 bytes


# ---------------------------------------------------------------------- pickles and code in model folders
@pytest.fixture
def bundled_copy(tmp_path):
    """The bundled model's SDXL and Qwen2-VL, copied to change (about 12 MB)."""
    shutil.copytree(BUNDLED_DIR / "sdxl", tmp_path / "sdxl")
    shutil.copytree(BUNDLED_DIR / "qwen2vl", tmp_path / "qwen2vl")
    return tmp_path


def _pickled(folder: Path, name: str) -> None:
    """Replace the folder's safetensors weights by a 'pickle' that nothing may open."""
    for path in folder.glob("*.safetensors"):
        path.unlink()
    (folder / name).write_bytes(b"\x80\x04never unpickled")


def _refusal(tmp_path, capsys, *flags) -> str:
    code = main(_generate_argv(tmp_path, *flags))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("easyref: error:"), err
    return err


def test_a_qwen2vl_folder_of_pickled_weights_is_refused(bundled_copy, capsys, no_model_load):
    _pickled(bundled_copy / "qwen2vl", "pytorch_model.bin")
    err = _refusal(bundled_copy, capsys, "--mllm", str(bundled_copy / "qwen2vl"))
    assert "holds pytorch_model.bin (pickled weights)" in err and "only safetensors weights" in err


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "text_encoder_2"])
def test_an_sdxl_component_of_pickled_weights_is_refused(bundled_copy, capsys, no_model_load, component):
    name = "pytorch_model.bin" if component.startswith("text") else "diffusion_pytorch_model.bin"
    _pickled(bundled_copy / "sdxl" / component, name)
    err = _refusal(bundled_copy, capsys, "--base", str(bundled_copy / "sdxl"))
    assert f"its {component}/ holds {name} (pickled weights)" in err


def test_pickles_beside_safetensors_are_left_alone(bundled_copy):
    (bundled_copy / "qwen2vl" / "pytorch_model.bin").write_bytes(b"ignored")
    (bundled_copy / "sdxl" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"ignored")
    parts = resolve_parts(bundled_copy / "sdxl", bundled_copy / "qwen2vl")
    assert (parts.base.path, parts.mllm.path) == (str(bundled_copy / "sdxl"), str(bundled_copy / "qwen2vl"))


MARKER = "imported.txt"
CODE = f"import pathlib\npathlib.Path(__file__).with_name({MARKER!r}).write_text('ran')\nclass MyScheduler: pass\n"


@pytest.mark.parametrize(
    "entry, phrase",
    [
        (("scheduler", ["my_module", "MyScheduler"]), "component 'scheduler' comes from the library 'my_module'"),
        (("unet", ["os", "system"]), "component 'unet' comes from the library 'os'"),
        (("unet", ["diffusers", 7]), "component 'unet' is ['diffusers', 7], not [library, class]"),
        (("scheduler", [1, {}]), "component 'scheduler' is [1, {}], not [library, class]"),
        (("../vae", ["diffusers", "AutoencoderKL"]), "component '../vae' is not a plain folder name"),
        (("_class_name", ["my_module", "MyPipeline"]), "_class_name ['my_module', 'MyPipeline'] is not a diffusers"),
    ],
)
def test_sdxl_components_from_elsewhere_are_refused(bundled_copy, capsys, no_model_load, entry, phrase):
    sdxl = bundled_copy / "sdxl"
    (sdxl / "my_module.py").write_text(CODE)
    _set("model_index.json", *entry)(sdxl)
    err = _refusal(bundled_copy, capsys, "--base", str(sdxl))
    assert phrase in err and not (sdxl / MARKER).exists()


def test_code_in_a_component_folder_is_refused(bundled_copy, capsys, no_model_load):
    (bundled_copy / "sdxl" / "scheduler" / "diffusers.py").write_text(CODE)
    err = _refusal(bundled_copy, capsys, "--base", str(bundled_copy / "sdxl"))
    assert "scheduler/diffusers.py is code in the model folder" in err


def test_a_qwen2vl_folder_naming_its_own_code_is_refused(bundled_copy, capsys, no_model_load):
    _set("tokenizer_config.json", "auto_map", {"AutoTokenizer": ["my_module.Tok", None]})(bundled_copy / "qwen2vl")
    err = _refusal(bundled_copy, capsys, "--mllm", str(bundled_copy / "qwen2vl"))
    assert "tokenizer_config.json names code of its own (auto_map)" in err


def test_every_load_asks_for_safetensors_and_no_folder_code(monkeypatch):
    """The loaders are told too, so that nothing the checks above miss can fall back to a pickle or code."""
    import diffusers

    from easyref.encoder import ReferenceEncoder

    calls = {}

    class Stop(Exception):
        pass

    def record(name):
        def load(*args, **kwargs):
            calls[name] = kwargs
            if name == "mllm":
                raise Stop
            return _FakeSDXL()

        return classmethod(lambda cls, *args, **kwargs: load(*args, **kwargs))

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained", record("base"))
    monkeypatch.setattr(ReferenceEncoder, "from_pretrained", record("mllm"))
    with pytest.raises(Stop):
        EasyRefPipeline.from_parts(resolve_parts())
    for name in ("base", "mllm"):
        assert calls[name]["use_safetensors"] is True and calls[name]["trust_remote_code"] is False, calls
    with pytest.raises(ValueError, match="use_safetensors=False is not supported"):
        EasyRefPipeline.from_parts(resolve_parts(), use_safetensors=False)


class _FakeSDXL:
    unet = None


# ---------------------------------------------------------------------- devices this machine lacks
@pytest.fixture
def no_mps_no_xpu(monkeypatch):
    """A Linux machine without an Intel GPU driver, whatever this one is."""
    monkeypatch.setattr(devices, "on_macos", lambda: False)
    monkeypatch.setattr(devices, "XPU_DRIVER_FILES", (str(Path(__file__).parent / "no-such-device*"),))


@pytest.mark.parametrize(
    "name, phrase",
    [
        ("meta", "meta is a placeholder device with no data; use cpu or cuda"),
        ("mps", "MPS (Apple silicon under macOS) is not available"),
        ("xpu", "no Intel XPU is available"),
        ("xpu:0", "no Intel XPU is available"),
    ],
)
def test_devices_this_machine_lacks_are_refused_before_torch(no_mps_no_xpu, name, phrase):
    with pytest.raises(DeviceError, match=re.escape(phrase)):
        check_device_name(name)


def test_the_cheap_checks_let_a_plausible_device_through_to_the_full_one(monkeypatch, tmp_path):
    """On macOS, or with a GPU driver, only torch can tell; `resolve_device` asks it."""
    monkeypatch.setattr(devices, "on_macos", lambda: True)
    (tmp_path / "renderD128").touch()
    monkeypatch.setattr(devices, "XPU_DRIVER_FILES", (str(tmp_path / "renderD*"),))
    for name in ("mps", "xpu:1"):
        check_device_name(name)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS"):
        resolve_device("mps")
    monkeypatch.delattr(torch, "xpu", raising=False)  # a torch built without it
    with pytest.raises(DeviceError, match="no Intel XPU"):
        resolve_device("xpu:1")


@pytest.mark.parametrize("name", ["meta", "hpu", "vulkan"])
def test_resolve_device_refuses_what_cannot_generate(name):
    with pytest.raises(DeviceError):
        resolve_device(name)


def test_an_available_xpu_index_is_checked(monkeypatch):
    class FakeXPU:
        is_available = staticmethod(lambda: True)
        device_count = staticmethod(lambda: 1)

    monkeypatch.setattr(torch, "xpu", FakeXPU, raising=False)
    assert resolve_device("xpu:0") == torch.device("xpu:0")
    with pytest.raises(DeviceError, match="this machine has 1 XPU device"):
        resolve_device("xpu:1")


@pytest.mark.parametrize("name", ["meta", "mps", "xpu", "xpu:0"])
def test_generate_on_a_missing_device_is_one_line_before_loading(tmp_path, capsys, no_model_load, no_mps_no_xpu, name):
    code = main(_generate_argv(tmp_path, "--device", name))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("easyref: error: --device"), err


def test_generate_when_only_torch_can_tell_is_refused_before_loading(tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.setattr(devices, "on_macos", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code = main(_generate_argv(tmp_path, "--device", "mps"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "MPS" in err, err


def test_a_record_made_on_a_device_this_machine_lacks(tmp_path, capsys, no_model_load, no_mps_no_xpu):
    ref = tmp_path / "ref.png"
    shape_image("red").save(ref)
    record = {
        "version": "0",
        "prompt": "a red circle",
        "references": [str(ref)],
        "scale": 1.0,
        "steps": 1,
        "guidance": 5.0,
        "seed": 0,
        "num_images": 1,
        "device": "mps",
    }
    text = PngImagePlugin.PngInfo()
    text.add_text("easyref", json.dumps(record))
    Image.new("RGB", (8, 8)).save(tmp_path / "made.png", pnginfo=text)
    code = main(["generate", "--from-metadata", str(tmp_path / "made.png"), "--out", str(tmp_path / "again.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "MPS" in err, err
    assert "made.png was made on device mps (add --device cpu" in err  # the record named it, not a flag
