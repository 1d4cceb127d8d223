"""One resolver for model names (`easyref.resolve`): `default`, folders, and hub ids read offline from a
Hugging Face cache laid out on disk as huggingface_hub writes it, with tiny models under the real ids."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import shape_image
from fake_hub import COMMIT, QWEN_ID, RELEASE_ID, SDXL_ID, build_hub, into_cache, release_pipeline
from PIL import Image

from easyref import EasyRefConfig, EasyRefPipeline
from easyref.bench.sources import check_source
from easyref.cli import main
from easyref.resolve import ResolveError, download_command, resolve, resolve_parts

# the tiny Qwen2-VL's vision tower is cheap at the release's 336 px references, but not free
TINY_RELEASE = {"reference_image_size": 56}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hub(tiny_dirs, tmp_path_factory):
    """HF_HUB_CACHE with the tiny SDXL, Qwen2-VL and a release-format EasyRef under the real hub ids."""
    return build_hub(tmp_path_factory.mktemp("hub"), tmp_path_factory.mktemp("scratch"), tiny_dirs)


@pytest.fixture
def offline(hub, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=hub for this process. huggingface_hub reads both once, at
    import; its `constants` are what it (and every loader) consults afterwards."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return hub


@pytest.fixture
def refs(tmp_path):
    paths = []
    for i, background in enumerate(("white", "gray")):
        paths.append(tmp_path / f"ref{i}.png")
        shape_image("red", background).save(paths[-1])
    return paths


def generate(out: Path, refs, *flags) -> int:
    argv = ["generate", *flags, "--prompt", "a red circle", "--out", str(out), "--steps", "2", "--seed", "0"]
    for ref in refs:
        argv += ["--ref", str(ref)]
    return main(argv)


def recorded(png: Path) -> dict:
    """The model an image was made with, as `load_pipeline` resolved it (base, mllm, adapter)."""
    with Image.open(png) as image:
        params = json.loads(image.text["easyref"])
    return params.get("sources", params)


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("easyref: error: "), lines
    return lines[0]


# ---------------------------------------------------------------------- hub ids, offline
def test_generate_by_hub_ids_offline(offline, refs, tmp_path):
    out = tmp_path / "out.png"
    assert generate(out, refs, "--base", SDXL_ID, "--mllm", QWEN_ID, "--adapter", RELEASE_ID) == 0
    params = recorded(out)
    assert (params["base"], params["mllm"], params["adapter"]) == (SDXL_ID, QWEN_ID, RELEASE_ID)
    with Image.open(out) as image:
        resolved = json.loads(image.text["easyref"])["resolved"]  # where they were: paths and commits
    assert {part: r["commit"] for part, r in resolved.items()} == {"base": COMMIT, "mllm": COMMIT, "adapter": COMMIT}


def test_release_alone_brings_its_base_and_mllm(offline, refs, tmp_path):
    """The release records nothing itself: its import names the authors' SDXL and Qwen2-VL."""
    out = tmp_path / "out.png"
    assert generate(out, refs, "--adapter", RELEASE_ID) == 0
    params = recorded(out)
    assert (params["base"], params["mllm"], params["adapter"]) == (SDXL_ID, QWEN_ID, RELEASE_ID)
    with Image.open(out) as image:
        resolved = json.loads(image.text["easyref"])["resolved"]  # where they were: paths and commits
    assert {part: r["commit"] for part, r in resolved.items()} == {"base": COMMIT, "mllm": COMMIT, "adapter": COMMIT}


def test_convert_by_hub_id_then_load_the_checkpoint_alone(offline, tmp_path):
    assert main(["convert", RELEASE_ID, str(tmp_path / "converted")]) == 0
    config = json.loads((tmp_path / "converted" / "easyref_config.json").read_text())
    assert (config["base"], config["mllm"], config["has_trunk"], config["lora_rank"]) == (SDXL_ID, QWEN_ID, True, 4)
    pipe = EasyRefPipeline.from_pretrained(adapter=tmp_path / "converted", config_overrides=TINY_RELEASE)
    assert pipe.easyref_config.base == SDXL_ID and pipe.unet.config.cross_attention_dim == 64


def test_convert_records_the_base_and_mllm_given(offline, tiny_dirs, tmp_path):
    """A release-format file trained on other models: --base/--mllm name them, and the result loads alone."""
    out = tmp_path / "converted"
    assert (
        main(["convert", RELEASE_ID, str(out), "--base", str(tiny_dirs["sdxl"]), "--mllm", str(tiny_dirs["qwen"])]) == 0
    )
    config = json.loads((out / "easyref_config.json").read_text())
    assert (config["base"], config["mllm"]) == (str(tiny_dirs["sdxl"]), str(tiny_dirs["qwen"]))
    parts = resolve_parts(adapter=out)
    assert (parts.base.path, parts.mllm.path) == (str(tiny_dirs["sdxl"]), str(tiny_dirs["qwen"]))


@pytest.mark.parametrize("base", [[], ["--base", SDXL_ID]], ids=["adapter alone", "base given"])
def test_bench_run_by_hub_ids_offline_records_what_reproduces_it(offline, refs, tmp_path, base):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "g", "references": [refs[0].name], "prompts": ["a red thing"]}))
    out = tmp_path / "run"
    assert (
        main(
            [
                "bench",
                "run",
                "--manifest",
                str(manifest),
                "--method",
                "easyref",
                *base,
                "--adapter",
                RELEASE_ID,
                "--steps",
                "2",
                "--height",
                "64",
                "--device",
                "cpu",
                "--no-score",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    header = json.loads((out / "run.json").read_text())
    method = header["method"]
    assert (method["base"], method["mllm"], method["adapter"]) == (SDXL_ID, QWEN_ID, RELEASE_ID)
    for part, name in (("base", SDXL_ID), ("mllm", QWEN_ID), ("adapter", RELEASE_ID)):
        resolved = method["resolved"][part]
        assert resolved["name"] == name and resolved["commit"] == COMMIT
        assert Path(resolved["path"]).is_absolute() and str(offline) in resolved["path"]
    side = method["default_size"]  # the tiny SDXL's: what an unset --width comes out at
    with Image.open(out / "images" / "g" / "p00-s00.png") as image:
        assert image.size == (side, 64)
    assert header["image_size"] == {"height": 64, "width": side}
    assert header["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    from importlib.metadata import version

    assert header["environment"]["torch"] == version("torch") and header["environment"]["easyref"] == version("easyref")


def test_bench_run_resumes_across_versions_but_not_another_manifest(offline, refs, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "g", "references": [refs[0].name], "prompts": ["a red thing"]}))
    out = tmp_path / "run"
    argv = [
        "bench",
        "run",
        "--manifest",
        str(manifest),
        "--method",
        "easyref",
        "--adapter",
        RELEASE_ID,
        "--steps",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--device",
        "cpu",
        "--no-score",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    header = json.loads((out / "run.json").read_text())
    header["environment"]["torch"] = "0.0.1"  # made before an upgrade: resuming is allowed, the record kept
    (out / "run.json").write_text(json.dumps(header))
    assert main(argv) == 0
    assert json.loads((out / "run.json").read_text())["environment"]["torch"] == "0.0.1"
    manifest.write_text(json.dumps({"id": "g", "references": [refs[0].name], "prompts": ["a blue thing"]}))
    capsys.readouterr()
    assert main(argv) == 2
    assert "different manifest_sha256" in capsys.readouterr().err


def test_bench_run_of_a_plain_method_needs_a_base(offline, tmp_path, capsys):
    assert (
        main(
            [
                "bench",
                "run",
                "--manifest",
                str(tmp_path / "m.jsonl"),
                "--method",
                "ip-adapter-mean",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--method ip-adapter-mean needs --base" in capsys.readouterr().err


def test_an_uncached_hub_id_offline_fails_at_once_naming_the_download(offline, refs, tmp_path, capsys):
    start = time.monotonic()
    code = generate(tmp_path / "out.png", refs, "--base", "someone/missing-sdxl")
    seconds = time.monotonic() - start
    line = one_line(capsys)
    assert code == 2 and seconds < 2, seconds
    assert "--base someone/missing-sdxl: " in line and "HF_HUB_OFFLINE is set" in line and str(offline) in line
    assert "`hf download someone/missing-sdxl --include '*.json'" in line
    assert not (tmp_path / "out.png").exists()


def test_a_checkpoint_naming_an_uncached_base_says_where_the_name_came_from(offline, tiny_dirs, tmp_path):
    adapter = tmp_path / "adapter"
    release_pipeline(tiny_dirs).save_adapter(adapter)
    config = json.loads((adapter / "easyref_config.json").read_text())
    (adapter / "easyref_config.json").write_text(json.dumps({**config, "base": "someone/missing-sdxl@v2"}))
    with pytest.raises(ResolveError) as caught:
        resolve_parts(adapter=adapter)
    message = str(caught.value)
    assert f"adapter {adapter} was made with base someone/missing-sdxl@v2: " in message
    assert "hf download someone/missing-sdxl --revision v2" in message and message.endswith("(or give base)")


def test_the_real_environment_variables_are_honoured(hub, tmp_path):
    """A fresh process: huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE from the environment."""
    script = (
        "from easyref.resolve import resolve\n"
        f"print(resolve({SDXL_ID!r}, 'base').path)\n"
        "resolve('someone/missing', 'mllm')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.strip() == str(hub / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots" / COMMIT)
    assert (
        "someone/missing: not in the local Hugging Face cache" in proc.stderr and "HF_HUB_OFFLINE is set" in proc.stderr
    )


def test_an_unreachable_hub_fails_at_once(hub, monkeypatch, refs, tmp_path, capsys):
    from huggingface_hub import constants

    import easyref.resolve as resolve_module

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.setattr(resolve_module, "_probe_result", {})
    start = time.monotonic()
    code = generate(tmp_path / "out.png", refs, "--base", "default", "--mllm", "someone/missing-qwen")
    line = one_line(capsys)
    assert code == 2 and time.monotonic() - start < 2
    assert "http://127.0.0.1:9 cannot be reached" in line and "`hf download someone/missing-qwen`" in line


def test_online_an_uncached_hub_id_is_downloaded_with_what_its_kind_needs(hub, monkeypatch, tmp_path):
    import diffusers
    import huggingface_hub
    from huggingface_hub import constants

    import easyref.resolve as resolve_module

    calls = []

    def fake_snapshot(repo_id, revision=None, cache_dir=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        if repo_id == "someone/gone":
            raise OSError("404 Client Error.\nRepository Not Found")  # the first line of the hub's errors
        return str(tmp_path / repo_id)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(resolve_module, "_probe_result", {constants.ENDPOINT: None})  # the hub answers
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(
        diffusers.DiffusionPipeline,
        "download",
        classmethod(
            lambda cls, repo_id, **kw: calls.append((repo_id, kw["revision"], "diffusers")) or str(tmp_path / repo_id)
        ),
    )
    assert resolve("someone/qwen@v2", "mllm").path == str(tmp_path / "someone/qwen")
    assert resolve("someone/sdxl", "base").path == str(tmp_path / "someone/sdxl")
    assert resolve("someone/clip").path == "someone/clip"  # any other model: its loader downloads it
    assert calls[0][:2] == ("someone/qwen", "v2") and "*.safetensors" in calls[0][2]
    assert calls[1] == ("someone/sdxl", None, "diffusers")  # diffusers' own choice of files
    with pytest.raises(ResolveError, match=r"could not download it from the hub \(404 Client Error.\); try `hf "):
        resolve("someone/gone", "adapter")


def test_a_revision_picks_its_snapshot(hub, tiny_dirs, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    other = "f" * 40
    into_cache(tiny_dirs["qwen"], hub, "someone/tiny-qwen", commit=other, ref="v1")
    assert Path(resolve("someone/tiny-qwen@v1", "mllm").path).name == other
    assert Path(resolve("someone/tiny-qwen", "mllm", revision=other).path).name == other
    with pytest.raises(ResolveError, match="not in the local Hugging Face cache"):
        resolve("someone/tiny-qwen", "mllm")  # no refs/main


def test_a_probe_in_a_subfolder_finds_the_snapshot_root(offline, tmp_path):
    """h94/IP-Adapter's weights are in sdxl_models/: the repository root is what loaders take."""
    folder = tmp_path / "ip"
    (folder / "sdxl_models").mkdir(parents=True)
    (folder / "sdxl_models" / "w.safetensors").write_bytes(b"x")
    snapshot = into_cache(folder, offline, "someone/ip-adapter")
    assert Path(resolve("someone/ip-adapter", probe="sdxl_models/w.safetensors").path) == snapshot


def test_the_download_command_is_the_installed_cli():
    from importlib.metadata import entry_points

    scripts = {e.name for e in entry_points(group="console_scripts") if e.value.startswith("huggingface_hub")}
    assert download_command(QWEN_ID).split()[0] in scripts
    assert download_command(SDXL_ID, "base") == (
        f"hf download {SDXL_ID} --include '*.json' --include '*.txt' --include 'text_encoder*/model.safetensors' "
        "--include unet/diffusion_pytorch_model.safetensors --include vae/diffusion_pytorch_model.safetensors"
    )


# ---------------------------------------------------------------------- `default`
def test_default_in_the_python_api(refs):
    pipe = EasyRefPipeline.from_pretrained("default")
    pipe.set_progress_bar_config(disable=True)
    image = pipe([Image.open(r) for r in refs], "an object on a white background", num_inference_steps=2, seed=0)
    assert image.images[0].size[0] > 0
    assert EasyRefPipeline.from_pretrained().easyref_config == pipe.easyref_config  # no names: the same model


def test_bench_run_base_default(refs, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "g", "references": [refs[0].name], "prompts": ["an object"]}))
    out = tmp_path / "run"
    assert (
        main(
            [
                "bench",
                "run",
                "--manifest",
                str(manifest),
                "--method",
                "easyref",
                "--base",
                "default",
                "--steps",
                "2",
                "--device",
                "cpu",
                "--no-score",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    method = json.loads((out / "run.json").read_text())["method"]
    assert (method["base"], method["mllm"], method["adapter"]) == ("default", "default", "default")
    assert check_source("default", "--base", kind="base").local  # what the sdxl and ip-adapter methods load


# ---------------------------------------------------------------------- self-describing adapters
@pytest.fixture
def own_adapter(tiny_dirs, tmp_path):
    """A checkpoint recording the tiny base and MLLM folders by absolute path, as our trainer does."""
    pipe = release_pipeline(tiny_dirs)
    pipe.reference_encoder.config.base = str(tiny_dirs["sdxl"])
    pipe.save_adapter(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_an_adapter_alone_loads_on_what_it_records(own_adapter, tiny_dirs, refs, tmp_path):
    out = tmp_path / "out.png"
    assert generate(out, refs, "--adapter", str(own_adapter)) == 0
    assert (recorded(out)["base"], recorded(out)["mllm"]) == (str(tiny_dirs["sdxl"]), str(tiny_dirs["qwen"]))


@pytest.mark.parametrize(
    "part, edit, phrase",
    [
        ("base", ("unet/config.json", "cross_attention_dim", 32), "does not fit the base"),
        ("mllm", ("config.json", "hidden_size", 32), "does not fit the MLLM"),
    ],
)
def test_a_part_that_does_not_fit_is_one_line_before_loading(
    own_adapter, tiny_dirs, refs, tmp_path, capsys, part, edit, phrase
):
    folder = tmp_path / part
    shutil.copytree(tiny_dirs["sdxl" if part == "base" else "qwen"], folder)
    name, key, value = edit
    config = json.loads((folder / name).read_text())
    (config.get("text_config", config) if part == "mllm" else config)[key] = value
    (folder / name).write_text(json.dumps(config))
    assert generate(tmp_path / "out.png", refs, "--adapter", str(own_adapter), f"--{part}", str(folder)) == 2
    assert phrase in one_line(capsys)


def test_configs_without_base_still_load_and_base_is_checked(tmp_path):
    data = EasyRefConfig().to_dict()
    del data["base"]  # written before the field existed
    assert EasyRefConfig.from_dict(data).base == SDXL_ID
    for value, phrase in (
        (5, "base must be a string"),
        ("", "base must name a model"),
        ("x" * 5000, "base must name a model"),
    ):
        with pytest.raises(ValueError, match=phrase):
            EasyRefConfig.from_dict({**data, "base": value})


def test_the_trainer_records_its_parts_and_prints_a_command_that_runs(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--write-example-data", "runs/example-data"]) == 0
    with caplog.at_level(logging.INFO):
        assert main(["train", "--config", "example-stage1", "--max-steps", "1", "--set", "batch_size=2"]) == 0
    final = Path("runs/example-stage1/final")
    config = json.loads((final / "easyref_config.json").read_text())
    assert (config["base"], config["mllm"]) == ("default", "default")
    assert all(Path(p).is_dir() for p in config["extra"]["resolved"].values())
    command = next(r.getMessage() for r in caplog.records if "try it with: " in r.getMessage()).split("try it with: ")[
        1
    ]
    words = shlex.split(command)
    assert words[:4] == ["easyref", "generate", "--adapter", str(final)]
    assert main(words[1:]) == 0  # exactly as printed
    assert Path(words[words.index("--out") + 1]).is_file()
