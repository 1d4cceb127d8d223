"""Import of the authors' released checkpoint layout: every key family, the LoRA, the finetuned trunk,
`.bin` files read without unpickling code."""

from __future__ import annotations

import pytest
import torch
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
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_hostile_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"module": {"x": _Payload()}}, tmp_path / "model.bin")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(tmp_path)
    assert not (tmp_path / "PWNED").exists()


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

        def get_tensor(self, key):
            read.append(key)
            return self._file.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    read_checkpoint(tmp_path)
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
