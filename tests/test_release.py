"""Import of the authors' released checkpoint layout: every key family, the LoRA, the finetuned trunk,
`.bin` files read without unpickling code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from conftest import shape_image
from model_checks import TINY_SETTINGS, perturb_trunk, to_release_state_dict, tokens, unet_output
from safetensors.torch import save_file

from easyref import EasyRefPipeline
from easyref.checkpoint import CheckpointError
from easyref.cli import main
from easyref.release import read_checkpoint


@pytest.mark.parametrize("rank, trunk, duplicates", [(0, False, False), (4, True, True)])
def test_release_import_round_trip(make_pipeline, tiny_dirs, groups, tmp_path, rank, trunk, duplicates):
    pipe = make_pipeline(lora_rank=rank, has_trunk=trunk)
    if trunk:
        perturb_trunk(pipe)
    release = tmp_path / "release"
    release.mkdir()
    save_file(to_release_state_dict(pipe, duplicates), str(release / "model.safetensors"))
    assert main(["convert", str(release), str(tmp_path / "converted"), "--mllm", str(tiny_dirs["qwen"])]) == 0
    for source in (tmp_path / "converted", release):  # converted, and transparently from the release folder
        loaded = EasyRefPipeline.from_pretrained(
            tiny_dirs["sdxl"], mllm=tiny_dirs["qwen"], adapter=source, config_overrides=TINY_SETTINGS, fuse_lora=False
        )
        assert loaded.easyref_config.lora_rank == rank and loaded.easyref_config.has_trunk == trunk
        torch.testing.assert_close(tokens(loaded, groups), tokens(pipe, groups), atol=0, rtol=0)
        torch.testing.assert_close(unet_output(loaded), unet_output(pipe), atol=0, rtol=0)


def test_release_import_rejects_unknown_keys(make_pipeline, tmp_path):
    tensors = to_release_state_dict(make_pipeline())
    tensors["something_else.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor something_else.weight"):
        read_checkpoint(tmp_path)


def test_release_bin_is_loaded_without_unpickling_code(make_pipeline, tiny_dirs, groups, tmp_path):
    pipe = make_pipeline()
    torch.save({"module": to_release_state_dict(pipe)}, tmp_path / "model.bin")
    loaded = EasyRefPipeline.from_pretrained(
        tiny_dirs["sdxl"], mllm=tiny_dirs["qwen"], adapter=tmp_path, config_overrides=TINY_SETTINGS
    )
    assert torch.equal(tokens(loaded, groups), tokens(pipe, groups))


class _Payload:
    """An object whose unpickling runs a shell command (creating `marker`): what a hostile .bin holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch " + str(self.marker),))


# the layouts a hostile file can take: torch.save's zip, its pre-zip format, a bare pickle (any protocol)
HOSTILE_LAYOUTS = {
    "torch.save": lambda payload, path: torch.save({"module": {"x": payload}}, path),
    "torch.save, old format": lambda payload, path: torch.save(
        {"x": payload}, path, _use_new_zipfile_serialization=False
    ),
    "bare pickle": lambda payload, path: path.write_bytes(pickle.dumps(payload)),
    "bare pickle, protocol 2": lambda payload, path: path.write_bytes(pickle.dumps({"x": payload}, protocol=2)),
}


@pytest.mark.parametrize("layout", list(HOSTILE_LAYOUTS))
def test_hostile_pickle_is_refused(tmp_path, layout):
    marker = tmp_path / "PWNED"
    HOSTILE_LAYOUTS[layout](_Payload(marker), tmp_path / "model.bin")
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors"):
        read_checkpoint(tmp_path)
    assert not marker.exists()


def _hostile_commands(tmp_path, evil):
    ref = tmp_path / "ref.png"
    shape_image("red").save(ref)
    adapter = ["--base", "default", "--mllm", "default", "--adapter", str(evil)]
    return {
        "convert": ["convert", str(evil), str(tmp_path / "out")],
        "generate": ["generate", "--prompt", "x", "--ref", str(ref), "--out", str(tmp_path / "x.png"), *adapter],
    }


@pytest.mark.parametrize("command", ["convert", "generate"])
@pytest.mark.parametrize("layout", ["torch.save", "bare pickle"])
def test_a_hostile_pickle_is_one_line_that_never_advises_unpickling_it(tmp_path, capsys, command, layout):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.bin"
    HOSTILE_LAYOUTS[layout](_Payload(marker), evil)
    argv = _hostile_commands(tmp_path, evil)[command]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("easyref: error:"), err
    assert f"{evil} holds Python objects other than tensors" in err and "refused" in err, err
    assert "weights_only" not in err and "Traceback" not in err, err
    assert not marker.exists() and not (tmp_path / "out").exists() and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "content, phrase",
    [
        (b"", "EOFError"),
        (b"hello world", "KeyError"),
        (b"PK\x03\x04" + bytes(100), "RuntimeError: PytorchStreamReader failed reading zip archive"),
    ],
)
def test_any_other_unreadable_file_is_the_first_line_of_its_error(tmp_path, capsys, content, phrase):
    (tmp_path / "model.bin").write_bytes(content)
    code = main(["convert", str(tmp_path / "model.bin"), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"cannot read {tmp_path / 'model.bin'}: {phrase}" in err, err


def test_tensors_the_conversion_does_not_keep_are_never_read(make_pipeline, tmp_path, monkeypatch):
    """The release file is mostly the frozen base UNet: those tensors are skipped by key, not loaded."""
    import safetensors

    tensors = to_release_state_dict(make_pipeline(), True)
    tensors["multimodal_llm.lm_head.weight"] = torch.zeros(16, 64)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    read = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self._file = real_open(*args, **kwargs)

        def keys(self):
            return self._file.keys()

        def get_slice(self, key):  # shapes from the header: no tensor data is read
            return self._file.get_slice(key)

        def get_tensor(self, key):
            read.append(key)
            return self._file.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    _, converted = read_checkpoint(tmp_path)
    assert not read  # tensors are read when loaded, one at a time
    for key in converted:  # what loading the checkpoint reads
        converted[key]
    frozen_base = {key for key in tensors if key.startswith("unet.") and ".processor." not in key}
    duplicates = {key for key in tensors if key.startswith("adapter_modules.")}
    skipped = frozen_base | duplicates | {"multimodal_llm.lm_head.weight"}
    assert frozen_base and duplicates and read and not skipped & set(read)
    assert set(read) == set(tensors) - skipped


def test_a_torch_file_in_the_old_format_is_still_read(make_pipeline, tiny_dirs, groups, tmp_path):
    """Files from before torch's zip format cannot be memory-mapped; they are read whole."""
    pipe = make_pipeline()
    torch.save(to_release_state_dict(pipe), tmp_path / "model.bin", _use_new_zipfile_serialization=False)
    _, tensors = read_checkpoint(tmp_path)
    _, expected = read_checkpoint_from_safetensors(pipe, tmp_path / "st")
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[key], expected[key]) for key in tensors)


def read_checkpoint_from_safetensors(pipe, folder):
    folder.mkdir()
    save_file(to_release_state_dict(pipe), str(folder / "model.safetensors"))
    return read_checkpoint(folder)
