"""The accelerate training loop: one stage, exact resume, atomic checkpoints, logs, validation grids.

Every random draw is a function of (seed, epoch, sample index): augmentation in the dataset, noise,
timestep and VAE sample here. So a resumed run repeats the uninterrupted one, and N processes with
batch B see the same samples, noise and update as one process with batch N * B.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType

from ..checkpoint import WEIGHTS_NAME, apply_checkpoint, read_checkpoint, save_checkpoint
from .config import STAGE_NAMES, TrainConfig, save_config
from .data import DataError, DataSettings, RankBatchSampler, TrainDataset, collate, global_batches, load_records
from .models import MLLMInputBuilder, StageModels, TrainingModel, cast_frozen, load_stage_models, select_trainables

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
FINAL_NAME = "final"
STATE_NAME = "trainer_state.json"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, and the data position (epoch, global batches consumed)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    samples: int = 0
    skipped: int = 0


class CollateForTraining:
    """Worker-side collate: stack the samples, then tokenise and preprocess their reference groups."""

    def __init__(self, build_inputs: MLLMInputBuilder):
        self.build_inputs = build_inputs

    def __call__(self, items):
        batch = collate(items)
        batch.mllm_inputs = self.build_inputs(batch.references, batch.texts) if len(batch) else None
        return batch


class Trainer:
    """`Trainer(config).train()` runs one stage to `config.max_steps` and returns the final checkpoint."""

    def __init__(
        self,
        config: TrainConfig,
        resume: str | None = None,
        cpu: bool | None = None,
        models: StageModels | None = None,
        model_class: type[TrainingModel] = TrainingModel,
    ):
        """`models` and `model_class` let benchmarks and notebooks supply models built in memory."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        # accelerate keeps one process-wide state; a second run in the same process (stage 1, then
        # stage 2 in a notebook) may use another precision. The distributed set-up itself is kept.
        AcceleratorState._reset_state()
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=_trackers(config),
            project_dir=str(self.output_dir),
            cpu=bool(cpu),  # otherwise accelerate decides (and a DeepSpeed launch stays DeepSpeed)
        )
        set_seed(config.seed)
        self.dataset = self._dataset()
        _check_validation_references(config)
        self.models = models or load_stage_models(config)
        self.model_class = model_class
        self.trainables = select_trainables(self.models, config.stage)
        self.state = TrainState()
        checkpoint = resolve_resume(self.output_dir, resume) if resume else None
        if checkpoint:
            self._load_model_state(checkpoint)
        self._prepare()
        if checkpoint:
            self._load_optimizer_state(checkpoint)

    # ------------------------------------------------------------------ set-up
    def _dataset(self) -> TrainDataset:
        c = self.config
        settings = DataSettings(
            stage=c.stage,
            resolution=c.resolution,
            crop=c.crop,
            keep_aspect=c.keep_aspect,
            bucket_stride=c.bucket_stride,
            max_references=c.max_references,
            truncate_rate=c.truncate_rate,
            image_drop_rate=c.image_drop_rate,
            text_drop_rate=c.text_drop_rate,
            both_drop_rate=c.both_drop_rate,
            face_expand_max=c.face_expand_max,
            flip_rate=c.flip_rate,
            seed=c.seed,
        )
        records = load_records(c.data)
        try:
            return TrainDataset(records, c.data_root, settings, c.allow_outside_root, strict=c.fail_on_bad_data)
        except DataError as err:
            raise DataError(f"{c.data}: {err}") from None

    def _prepare(self) -> None:
        c, models = self.config, self.models
        acc = self.accelerator
        weight_dtype = DTYPES[c.mixed_precision]
        cast_frozen(models, weight_dtype, c.stage)
        if c.gradient_checkpointing:
            models.encoder.gradient_checkpointing_enable()
            models.unet.enable_gradient_checkpointing()
        models.vae.to(acc.device, torch.float32)
        models.text_pipe.text_encoder.to(acc.device)
        models.text_pipe.text_encoder_2.to(acc.device)
        params = [p for _, p in self.trainables]
        optimizer = torch.optim.AdamW(
            params,
            lr=c.learning_rate,
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon,
            weight_decay=c.weight_decay,
        )
        from diffusers.optimization import get_scheduler

        plugin = acc.state.deepspeed_plugin
        if plugin is not None:  # our loader is not prepared by accelerate, so DeepSpeed is told the batch
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = c.batch_size
        # stepped once per optimizer step by us (accelerate's wrapper would step it once per process)
        self.lr_scheduler = get_scheduler(c.lr_scheduler, optimizer, num_warmup_steps=c.lr_warmup_steps)
        self.model, self.optimizer = acc.prepare(self.model_class(models.encoder, models.unet), optimizer)
        self.model.train()
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if acc.is_main_process and acc.log_with:
            acc.init_trackers("easyref", config=_flat_config(c))

    @property
    def per_process_batch(self) -> int:
        return self.config.batch_size

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        self.fit(self.config.max_steps)
        final = self._save_final()
        self.accelerator.end_training()
        return final

    def fit(self, max_steps: int) -> None:
        """Optimizer steps until `max_steps` (checkpoints, logs and validation on their schedules)."""
        c, acc = self.config, self.accelerator
        self._check_data()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(c, self.output_dir / "train_config.yaml")
            logger.info(
                "stage %d (%s): %d records, %d trainable tensors (%s parameters), global batch %d x %d accumulation",
                c.stage, STAGE_NAMES[c.stage], len(self.dataset), len(self.trainables),
                f"{sum(p.numel() for _, p in self.trainables):,}", self.global_batch, c.gradient_accumulation_steps,
            )
        progress = _progress(max_steps, self.state.step, acc.is_main_process)
        meter = _Meter()
        while self.state.step < max_steps:
            for batch, data_time in self._epoch_batches():
                meter.add_data_time(data_time)
                loss = self._micro_step(batch)
                meter.add(loss, len(batch))
                self.state.batch += 1
                self.state.samples += len(batch) * acc.num_processes
                self.state.skipped += len(batch.skipped)
                if acc.sync_gradients:
                    self.state.step += 1
                    progress.update(1)
                    self._after_step(meter, progress)
                    if self.state.step >= max_steps:
                        break
            else:
                self._end_epoch()
        progress.close()

    def _check_data(self) -> None:
        count = sum(len(b) for b in global_batches(self.dataset, self.global_batch, self.config.seed, 0))
        if count == 0:
            raise ValueError(
                f"{self.config.data}: {len(self.dataset)} records do not fill one global batch of {self.global_batch}"
                " (per target-size bucket); add data or lower batch_size"
            )

    def _epoch_batches(self):
        """This process's batches from the current data position to the end of the epoch."""
        c, acc = self.config, self.accelerator
        sampler = RankBatchSampler(
            self.dataset, self.global_batch, acc.num_processes, acc.process_index, c.seed, self.state.epoch,
            start=self.state.batch,
        )
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=CollateForTraining(MLLMInputBuilder(self.models.encoder)),
            num_workers=c.num_workers,
        )
        started = time.perf_counter()
        for batch in loader:
            yield batch, time.perf_counter() - started
            started = time.perf_counter()

    def _end_epoch(self) -> None:
        if self.state.skipped:
            logger.warning(
                "epoch %d: %d samples skipped (missing or unreadable images; fail_on_bad_data stops instead)",
                self.state.epoch, self.state.skipped,
            )
        self.state.epoch += 1
        self.state.batch = 0
        self.state.skipped = 0

    def _micro_step(self, batch) -> float:
        acc = self.accelerator  # skipped samples were already logged, one line each, by `collate`
        with acc.accumulate(self.model):
            loss = self._loss(batch) if len(batch) else _zero_loss(self.trainables)
            acc.backward(loss)
            if acc.sync_gradients and self.config.max_grad_norm > 0:
                acc.clip_grad_norm_([p for _, p in self.trainables], self.config.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _loss(self, batch) -> torch.Tensor:
        models, acc = self.models, self.accelerator
        device = acc.device
        generators = [torch.Generator().manual_seed(seed) for seed in batch.noise_seeds]
        with torch.no_grad():
            latents = _encode_latents(models.vae, batch.pixel_values.to(device), generators)
            prompt_embeds, pooled = self._text_embeds(batch.texts)
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(device)
        if self.config.noise_offset:
            offsets = torch.stack([torch.randn(latents.shape[1], 1, 1, generator=g) for g in generators])
            noise = noise + self.config.noise_offset * offsets.to(device)
        steps = models.noise_scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators]).to(device)
        noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)
        target = _target(models.noise_scheduler, latents, noise, timesteps)
        time_ids = batch.time_ids.to(device, prompt_embeds.dtype)
        with acc.autocast():
            pred = self.model(batch.mllm_inputs.to(device), noisy, timesteps, prompt_embeds, pooled, time_ids)
        return F.mse_loss(pred.float(), target.float())

    def fixed_batch(self, indices: list[int], epoch: int = 0):
        """The samples at these dataset indices, collated exactly as the loop would (for evaluation)."""
        items = [self.dataset[(epoch, i)] for i in indices]
        return CollateForTraining(MLLMInputBuilder(self.models.encoder))(items)

    def evaluate_loss(self, batch) -> float:
        """The training loss on a batch, with its fixed per-sample noise, without updating anything."""
        with torch.no_grad():
            return float(self._loss(batch))

    def _text_embeds(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's own prompt encoding (penultimate CLIP states, pooled from encoder 2), optionally cached."""
        if not self.config.cache_text_embeds:
            return self._encode_prompts(texts)
        missing = sorted({t for t in texts if t not in self.text_cache})
        if missing:
            embeds, pooled = self._encode_prompts(missing)
            for i, text in enumerate(missing):
                self.text_cache[text] = (embeds[i].cpu(), pooled[i].cpu())
        device = self.accelerator.device
        embeds = torch.stack([self.text_cache[t][0] for t in texts]).to(device)
        pooled = torch.stack([self.text_cache[t][1] for t in texts]).to(device)
        return embeds, pooled

    def _encode_prompts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.models.text_pipe.encode_prompt(
            prompt=texts, device=self.accelerator.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled

    # ------------------------------------------------------------------ after each step
    def _after_step(self, meter: "_Meter", progress) -> None:
        c, step = self.config, self.state.step
        if step % c.log_every == 0 or step == c.max_steps:
            self._log(meter.flush(self.accelerator), progress)
        if step % c.checkpoint_every == 0 and step < c.max_steps:
            self.save_checkpoint()
        if c.validation_every and step % c.validation_every == 0:
            self.validate()

    def _log(self, metrics: dict, progress) -> None:
        acc = self.accelerator
        metrics.update(step=self.state.step, lr=self.lr_scheduler.get_last_lr()[0], peak_memory_gib=_peak_memory_gib())
        if not acc.is_main_process:
            return
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{metrics['samples_per_s']:.2f}")
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if acc.log_with:
            acc.log({k: v for k, v in metrics.items() if k != "step"}, step=self.state.step)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoint-N/{model (inference format), optimizer.pt, scheduler.pt, rng-R.pt, trainer_state.json},
        written under a temporary name and renamed, so an interrupted save leaves no checkpoint-N."""
        acc = self.accelerator
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.state.step:07d}"
        temp = self.output_dir / f".{final.name}.tmp"
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        acc.wait_for_everyone()
        if acc.distributed_type == DistributedType.DEEPSPEED:  # ZeRO shards optimizer state across processes
            acc.save_state(str(temp / "accelerate"))
        torch.save(_rng_state(), temp / f"rng-{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._write_checkpoint_files(temp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(temp, final)
            self._prune_checkpoints()
            logger.info("saved %s", final)
        acc.wait_for_everyone()
        return final

    def _write_checkpoint_files(self, folder: Path) -> None:
        models = self.models
        save_checkpoint(folder / "model", models.model_config, models.encoder, models.unet)
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(self.lr_scheduler.state_dict(), folder / "scheduler.pt")
        (folder / STATE_NAME).write_text(json.dumps({"state": asdict(self.state), "config": self.config.to_dict()}))

    def _prune_checkpoints(self) -> None:
        keep = self.config.keep_checkpoints
        if keep == 0:
            return
        for old in list_checkpoints(self.output_dir)[:-keep]:
            shutil.rmtree(old)

    def _save_final(self) -> Path:
        acc = self.accelerator
        final = self.output_dir / FINAL_NAME
        self.save_checkpoint()  # the full training state at the end too, so a run can be extended
        if acc.is_main_process:
            save_checkpoint(final, self.models.model_config, self.models.encoder, self.models.unet)
            logger.info("inference checkpoint: %s (load with `easyref generate --adapter %s`)", final, final)
        acc.wait_for_everyone()
        return final

    def _load_model_state(self, folder: Path) -> None:
        config, tensors = read_checkpoint(folder / "model")
        apply_checkpoint(config, tensors, self.models.encoder, self.models.unet)
        saved = json.loads((folder / STATE_NAME).read_text())
        self.state = TrainState(**saved["state"])
        _warn_config_changes(saved["config"], self.config)
        logger.info("resuming from %s at step %d (epoch %d, batch %d)", folder, self.state.step, self.state.epoch, self.state.batch)

    def _load_optimizer_state(self, folder: Path) -> None:
        if (folder / "accelerate").is_dir():
            self.accelerator.load_state(str(folder / "accelerate"))
        else:
            # written by this trainer, still read without unpickling arbitrary objects
            self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))
        self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        rng = folder / f"rng-{self.accelerator.process_index}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=True))

    # ------------------------------------------------------------------ validation
    def validate(self) -> Path | None:
        """Generate the fixed validation group and prompt; write a grid PNG under validation/."""
        from .validation import write_validation_grid

        if not self.accelerator.is_main_process:
            return None
        self.model.eval()
        try:
            with self.accelerator.autocast():
                return write_validation_grid(self.models, self.config, self.output_dir, self.state.step)
        finally:
            self.model.train()


# ---------------------------------------------------------------------- helpers
def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "model" / WEIGHTS_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def resolve_resume(output_dir: Path, resume: str) -> Path:
    """`latest` = the newest complete checkpoint in the output folder; otherwise a checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {output_dir}")
        return found[-1]
    folder = Path(resume)
    if not (folder / STATE_NAME).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a training checkpoint (no {STATE_NAME})")
    return folder


def _rng_state() -> dict:
    """The global generators. The loop draws nothing from them (all its randomness is keyed per
    sample), but a model with dropout would, so a resumed run restores them too."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_validation_references(config: TrainConfig) -> None:
    """Fail at start-up, not at the first validation hours later."""
    if not config.validation_every:
        return
    from .config import ConfigError
    from .validation import load_validation_references

    try:
        load_validation_references(config.validation_references)
    except OSError as err:
        raise ConfigError(f"validation_references: {err}") from None


def _warn_config_changes(saved: dict, config: TrainConfig) -> None:
    changed = sorted(k for k, v in config.to_dict().items() if saved.get(k) != v and k not in ("max_steps", "output_dir"))
    if changed:
        logger.warning("resuming with changed settings (the run will not repeat the original exactly): %s", ", ".join(changed))


def _encode_latents(vae, pixels: torch.Tensor, generators) -> torch.Tensor:
    """fp32 VAE encode; the posterior sample draws from each sample's own generator."""
    posterior = vae.encode(pixels.float()).latent_dist
    eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in generators]).to(pixels.device)
    latents = posterior.mean + posterior.std * eps
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def _target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} in the base model's scheduler")


def _zero_loss(trainables) -> torch.Tensor:
    """A batch whose every image was unreadable still joins the gradient all-reduce, with zero effect."""
    return sum(p.sum() for _, p in trainables) * 0.0


def _trackers(config: TrainConfig):
    if not config.tensorboard:
        return None
    from accelerate.utils import is_tensorboard_available

    return "tensorboard" if is_tensorboard_available() else None


def _flat_config(config: TrainConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _progress(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


class _Meter:
    """Loss, throughput and data-wait share since the last log line."""

    def __init__(self):
        self._reset()

    def _reset(self):
        self.losses, self.samples, self.data_time, self.started = [], 0, 0.0, time.perf_counter()

    def add(self, loss: float, samples: int) -> None:
        self.losses.append(loss)
        self.samples += samples

    def add_data_time(self, seconds: float) -> None:
        self.data_time += seconds

    def flush(self, accelerator) -> dict:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {
            "loss": sum(self.losses) / max(len(self.losses), 1),
            "samples_per_s": self.samples * accelerator.num_processes / elapsed,
            "data_time_share": self.data_time / elapsed,
        }
        if not math.isfinite(out["loss"]):
            logger.warning("loss is %s", out["loss"])
        self._reset()
        return out
