"""`easyref train` on tiny random components: stages, trainables, overfitting, exact resume, DDP."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_run import TINY_RUN, write_config

from easyref.checkpoint import WEIGHTS_NAME
from easyref.cli import main
from easyref.train.config import TrainConfig
from easyref.train.example import write_example_data
from easyref.train.trainer import Trainer

DATA_KEYS = {1: "pairs", 2: "faces", 3: "groups"}


@pytest.fixture(scope="session")
def example_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, write_example_data(root, subjects=4, per_subject=3, size=48)


def settings(tiny_dirs, example_data, out: Path, stage: int = 1, **overrides) -> dict:
    root, paths = example_data
    values = dict(
        stage=stage,
        base=str(tiny_dirs["sdxl"]),
        mllm=str(tiny_dirs["qwen"]),
        output_dir=str(out),
        data=str(paths[DATA_KEYS[stage]]),
        data_root=str(root),
        **TINY_RUN,
    )
    values.update(overrides)
    return values


@pytest.fixture(scope="session")
def stage1_checkpoint(tiny_dirs, example_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    return Trainer(TrainConfig(**settings(tiny_dirs, example_data, out))).train()


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    models = trainer.models
    out = {}
    for prefix, module in (
        ("encoder", models.encoder),
        ("unet", models.unet),
        ("vae", models.vae),
        ("text_encoder", models.text_pipe.text_encoder),
        ("text_encoder_2", models.text_pipe.text_encoder_2),
    ):
        out.update({f"{prefix}.{k}": p.detach().clone() for k, p in module.named_parameters()})
    return out


# ---------------------------------------------------------------------- the three stages, end to end
def test_three_stages_through_the_cli_then_generate(tiny_dirs, example_data, tmp_path):
    refs = sorted(str(p) for p in (example_data[0] / "images").glob("000_*.png"))
    final = None
    for stage in (1, 2, 3):
        extra = {"init_from": str(final)} if final else {}
        if stage == 1:
            extra.update(validation_every=2, validation_references=refs[:2], validation_steps=2)
        if stage == 3:
            extra.update(keep_aspect=True, truncate_rate=0.4, batch_size=1)
        cfg = write_config(
            tmp_path / f"stage{stage}.yaml", settings(tiny_dirs, example_data, tmp_path / f"s{stage}", stage, **extra)
        )
        assert main(["train", "--config", str(cfg), "--set", "checkpoint_every=1"]) == 0
        final = tmp_path / f"s{stage}" / "final"
        assert (final / WEIGHTS_NAME).is_file()
        metrics = [json.loads(line) for line in (tmp_path / f"s{stage}" / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2]
        assert all(m["loss"] > 0 and m["samples_per_s"] > 0 and m["lr"] == 1e-3 for m in metrics)
        assert (tmp_path / f"s{stage}" / "checkpoint-0000002" / "model" / WEIGHTS_NAME).is_file()
        assert not list((tmp_path / f"s{stage}").glob(".*tmp")), "no temporary checkpoint may be left behind"
    assert (tmp_path / "s1" / "validation" / "step-0000002.png").is_file()
    saved = json.loads((final / "easyref_config.json").read_text())
    assert saved["has_trunk"] and saved["lora_rank"] == 4
    out = tmp_path / "out.png"
    args = ["generate", "--base", str(tiny_dirs["sdxl"]), "--adapter", str(final), "--prompt", "a picture"]
    assert main(args + ["--ref", refs[0], "--ref", refs[1], "--out", str(out), "--steps", "2", "--seed", "0"]) == 0
    assert out.is_file()


# ---------------------------------------------------------------------- what each stage trains
TRAINED = {
    1: ("encoder.aggregator.", "to_k_ip", "to_v_ip", "unet.encoder_hid_proj."),
    2: ("encoder.", "to_k_ip", "to_v_ip", "unet.encoder_hid_proj.", "lora_"),
}


def _matches(name: str, mark: str) -> bool:
    return name.startswith(mark) if mark.endswith(".") else mark in name


@pytest.mark.parametrize("stage", [1, 2])
def test_exactly_the_intended_parameters_change(tiny_dirs, example_data, stage1_checkpoint, tmp_path, stage):
    extra = {"init_from": str(stage1_checkpoint)} if stage > 1 else {}
    trainer = Trainer(TrainConfig(**settings(tiny_dirs, example_data, tmp_path, stage, max_steps=3, **extra)))
    before = snapshot(trainer)
    trainer.train()
    after = snapshot(trainer)
    intended = {k for k in before if any(_matches(k, mark) for mark in TRAINED[stage])}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == intended, (sorted(changed - intended)[:3], sorted(intended - changed)[:3])
    assert {f"encoder.{n}" for n, p in trainer.models.encoder.named_parameters() if p.requires_grad} <= intended


def test_stage2_starts_from_stage1(tiny_dirs, example_data, stage1_checkpoint, tmp_path):
    trainer = Trainer(TrainConfig(**settings(tiny_dirs, example_data, tmp_path, 2, init_from=str(stage1_checkpoint))))
    saved = load_file(str(stage1_checkpoint / WEIGHTS_NAME))
    tokens = trainer.models.encoder.aggregator.reference_tokens
    assert torch.equal(tokens.detach(), saved["aggregator.reference_tokens"])
    assert trainer.models.model_config.lora_rank == 4 and trainer.models.model_config.has_trunk


# ---------------------------------------------------------------------- learning
def test_loss_decreases_on_a_fixed_batch(tiny_dirs, example_data, tmp_path):
    data = tmp_path / "two.json"
    pairs = [{"image_file": f"images/00{i}_0.png", "text": "a shape", "target": f"images/00{i}_0.png"} for i in (0, 1)]
    data.write_text(json.dumps(pairs))
    no_drops = dict(image_drop_rate=0.0, text_drop_rate=0.0, both_drop_rate=0.0)
    values = settings(
        tiny_dirs,
        example_data,
        tmp_path / "run",
        1,
        data=str(data),
        crop="center",
        max_steps=60,
        learning_rate=1e-2,
        log_every=100,
        **no_drops,
    )
    trainer = Trainer(TrainConfig(**values))
    # the same two images under 8 fixed noise/timestep draws, so one lucky timestep cannot decide it
    batches = [trainer.fixed_batch([0, 1], epoch=e) for e in range(8)]
    before = sum(trainer.evaluate_loss(b) for b in batches) / len(batches)
    trainer.train()
    after = sum(trainer.evaluate_loss(b) for b in batches) / len(batches)
    assert after < 0.93 * before, (before, after)


# ---------------------------------------------------------------------- exact resume
class Killed(Exception):
    pass


def test_resume_continues_exactly(tiny_dirs, example_data, stage1_checkpoint, tmp_path, monkeypatch):
    values = dict(
        max_steps=4,
        checkpoint_every=2,
        batch_size=1,
        gradient_accumulation_steps=2,
        init_from=str(stage1_checkpoint),
        truncate_rate=0.4,
    )
    straight = Trainer(TrainConfig(**settings(tiny_dirs, example_data, tmp_path / "a", 3, **values)))
    straight.train()

    interrupted = Trainer(TrainConfig(**settings(tiny_dirs, example_data, tmp_path / "b", 3, **values)))
    original = Trainer._after_step

    rng_at_step_2 = {}

    def die_after_step_3(self, meter, progress):
        original(self, meter, progress)
        if self.state.step == 2:
            rng_at_step_2["torch"] = torch.get_rng_state()
        if self.state.step == 3:
            raise Killed

    monkeypatch.setattr(Trainer, "_after_step", die_after_step_3)
    with pytest.raises(Killed):
        interrupted.train()
    monkeypatch.setattr(Trainer, "_after_step", original)
    resumed = Trainer(TrainConfig(**settings(tiny_dirs, example_data, tmp_path / "b", 3, **values)), resume="latest")
    assert resumed.state.step == 2
    assert torch.equal(torch.get_rng_state(), rng_at_step_2["torch"])  # global generators restored too
    resumed.train()

    a = load_file(str(tmp_path / "a" / "final" / WEIGHTS_NAME))
    b = load_file(str(tmp_path / "b" / "final" / WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    losses = lambda run: [
        m["loss"] for m in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
    ]
    assert losses("a") == pytest.approx(losses("b")[:2] + losses("b")[-2:], abs=1e-6)


# ---------------------------------------------------------------------- two processes == one
def test_two_processes_equal_one_with_the_doubled_batch(tiny_dirs, example_data, tmp_path):
    base = settings(tiny_dirs, example_data, tmp_path / "one", 1, max_steps=2, batch_size=2)
    cfg = write_config(tmp_path / "cfg.yaml", base)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes runs: the same thread count on both sides
    try:
        assert main(["train", "--config", str(cfg), "--cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "easyref",
        "train",
        "--config",
        str(cfg),
        "--cpu",
        "--set",
        "batch_size=1",
        f"output_dir={tmp_path / 'two'}",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one = load_file(str(tmp_path / "one" / "final" / WEIGHTS_NAME))
    two = load_file(str(tmp_path / "two" / "final" / WEIGHTS_NAME))
    start = Trainer(TrainConfig(**base)).models  # untrained values: the update must not be trivially zero
    assert not torch.equal(one["aggregator.reference_tokens"], start.encoder.aggregator.reference_tokens.detach())
    # AdamW moves a weight by lr * m / (sqrt(v) + eps) a step, about lr * sign(gradient) early on. Where a
    # gradient is at the level of float noise (two processes sum it in another order than one, and thread
    # counts differ between machines), its step may take any value within lr. So: nearly every element
    # equal to rounding, and none further apart than lr a step; a missing all-reduce breaks the first.
    bound = base["learning_rate"] * base["max_steps"]
    diffs = {key: (one[key] - two[key]).abs().flatten() for key in one}
    assert all(diff.max() <= bound for diff in diffs.values()), {k: float(d.max()) for k, d in diffs.items()}
    apart = torch.cat(list(diffs.values())) > 1e-5
    assert apart.float().mean() <= 1e-3, f"{int(apart.sum())} of {apart.numel()} weights differ"


# ---------------------------------------------------------------------- options
def test_text_cache_and_bf16_autocast(tiny_dirs, example_data, tmp_path):
    plain = Trainer(TrainConfig(**settings(tiny_dirs, example_data, tmp_path / "a")))
    cached = Trainer(TrainConfig(**settings(tiny_dirs, example_data, tmp_path / "b", cache_text_embeds=True)))
    batch = plain.fixed_batch([0, 1, 2])
    assert cached.evaluate_loss(batch) == pytest.approx(plain.evaluate_loss(batch), abs=1e-6)
    assert len(cached.text_cache) == len(set(batch.texts))
    mixed = Trainer(
        TrainConfig(
            **settings(tiny_dirs, example_data, tmp_path / "c", mixed_precision="bf16", gradient_checkpointing=True)
        )
    )
    assert mixed.models.text_pipe.text_encoder.dtype == torch.bfloat16
    assert mixed.models.vae.dtype == torch.float32
    mixed.train()
    assert (tmp_path / "c" / "final" / WEIGHTS_NAME).is_file()


def test_bad_images_are_reported_or_fatal(tiny_dirs, example_data, tmp_path, caplog):
    root, paths = example_data
    records = json.loads(paths["pairs"].read_text())
    records[0] = {"image_file": "images/missing.png", "text": "x", "target": "images/missing.png"}
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    values = settings(tiny_dirs, example_data, tmp_path / "run", data=str(data), max_steps=7)  # epoch 0 = 6 steps
    with caplog.at_level(logging.WARNING):
        Trainer(TrainConfig(**values)).train()
    assert "missing.png: file not found" in caplog.text
    assert "epoch 0: 1 samples skipped" in caplog.text
    cfg = write_config(
        tmp_path / "strict.yaml", {**values, "fail_on_bad_data": True, "output_dir": str(tmp_path / "s")}
    )
    assert main(["train", "--config", str(cfg)]) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["nonsense=1"], "unknown setting 'nonsense'"),
        (["stage=2"], "init_from"),
        (["data=nowhere.json"], "nowhere.json"),
        (["learning_rate=0"], "learning_rate"),
        (["batch_size=100"], "global batch"),
        (["validation_every=5", "validation_references=[nowhere.png]"], "validation_references: nowhere.png"),
        (
            ["stage=2", "init_from=/no/such/checkpoint"],
            "pairs.json: record index 0 (target 'images/000_0.png'): stage 2 needs",
        ),
        (["stage=2", "init_from=/no/such/checkpoint", "data=FACES"], "/no/such/checkpoint"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_dirs, example_data, tmp_path, capsys, overrides, message):
    cfg = write_config(tmp_path / "cfg.yaml", settings(tiny_dirs, example_data, tmp_path / "run"))
    overrides = [o.replace("FACES", str(example_data[1]["faces"])) for o in overrides]
    assert main(["train", "--config", str(cfg), "--set", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("easyref: error:") and message in err[0], err


def test_recipes_reproduce_the_paper_table():
    from easyref.train.config import load_config

    one = load_config("stage1")
    two = load_config("stage2")
    three = load_config("stage3")
    assert (one.learning_rate, two.learning_rate, three.learning_rate) == (1e-4, 4e-5, 2e-5)
    assert (
        (one.lora_rank, two.lora_rank) == (0, 128) and not one.trains_trunk and two.trains_trunk and three.trains_trunk
    )
    assert three.truncate_rate == 0.4 and three.keep_aspect and one.resolution == two.resolution == 1024
    assert all(
        c.weight_decay == 0 and c.lr_scheduler == "constant" and c.mixed_precision == "bf16" for c in (one, two, three)
    )
    assert all((c.image_drop_rate, c.text_drop_rate, c.both_drop_rate) == (0.05, 0.05, 0.05) for c in (one, two, three))
    assert (one.batch_size * 32, two.batch_size * 32, three.batch_size * 32) == (256, 256, 128)


def test_example_recipes_run_on_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--write-example-data", "runs/example-data"]) == 0
    for stage in (1, 2, 3):
        assert main(["train", "--config", f"example-stage{stage}", "--max-steps", "1", "--set", "batch_size=2"]) == 0
    final = tmp_path / "runs" / "example-stage3" / "final"
    assert json.loads((final / "easyref_config.json").read_text())["mllm"] == "default"
    out = tmp_path / "out.png"
    args = ["generate", "--base", "default", "--adapter", str(final), "--ref", "runs/example-data/images/000_0.png"]
    # the Makefile's train-demo prompt: words the bundled model knows (tests/test_vocabulary.py)
    prompt = "an object on a white background"
    assert main(args + ["--prompt", prompt, "--out", str(out), "--steps", "2", "--seed", "0"]) == 0
    assert out.is_file()


def test_every_model_setting_reaches_the_checkpoint_from_the_command_line(tmp_path, monkeypatch):
    """Top-level model settings and the `model` mapping (here through `--set model.KEY=...`) are what the
    checkpoint's config records; a later stage keeps the attention mode it does not set."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--write-example-data", "runs/example-data"]) == 0
    stage1 = [
        "--set",
        "attention_mode=bidirectional",
        "--set",
        "model.negative_prompt=blurry",
        "--set",
        "model.instruction=Draw {prompt}",
    ]
    for stage, extra in ((1, stage1), (2, [])):
        args = ["train", "--config", f"example-stage{stage}", "--max-steps", "1", "--set", "batch_size=2"]
        assert main(args + extra) == 0
    for stage in (1, 2):
        config = json.loads((tmp_path / "runs" / f"example-stage{stage}" / "final" / "easyref_config.json").read_text())
        assert config["attention_mode"] == "bidirectional"
        assert config["negative_prompt"] == "blurry" and config["instruction"] == "Draw {prompt}"


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (it is not a dependency; install it to run this check)",
)
def test_deepspeed_zero2_equals_plain_training_and_resumes_exactly(
    tiny_dirs, example_data, stage1_checkpoint, tmp_path
):
    from easyref.train.config import RECIPES

    ds_config = yaml.safe_load((RECIPES / "deepspeed_zero2.yaml").read_text())
    ds_config.update(num_processes=1, mixed_precision="no")
    accelerate_cfg = tmp_path / "ds.yaml"
    accelerate_cfg.write_text(yaml.safe_dump(ds_config))
    values = settings(
        tiny_dirs,
        example_data,
        tmp_path / "plain",
        2,
        init_from=str(stage1_checkpoint),
        max_steps=4,
        checkpoint_every=2,
    )
    cfg = write_config(tmp_path / "cfg.yaml", values)
    assert main(["train", "--config", str(cfg)]) == 0

    def launch(out, steps, *extra):
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(accelerate_cfg),
            "-m",
            "easyref",
            "train",
            "--config",
            str(cfg),
            "--output-dir",
            str(tmp_path / out),
            "--max-steps",
            str(steps),
            *extra,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    launch("ds", 4)
    launch("resumed", 2)
    launch("resumed", 4, "--resume", "latest")
    assert (
        tmp_path / "ds" / "checkpoint-0000004" / "accelerate"
    ).is_dir()  # ZeRO's sharded state went through accelerate
    plain = load_file(str(tmp_path / "plain" / "final" / WEIGHTS_NAME))
    for run in ("ds", "resumed"):
        other = load_file(str(tmp_path / run / "final" / WEIGHTS_NAME))
        for key in plain:
            torch.testing.assert_close(other[key], plain[key], rtol=0, atol=1e-6, msg=f"{run}: {key}")
