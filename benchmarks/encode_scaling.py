"""Reference-encoding time and peak memory against the number of references: ours vs the release's way.

Run (from the repository root):

    .venv/bin/python benchmarks/encode_scaling.py                       # tiny Qwen2-VL, CPU, ~1 min
    .venv/bin/python benchmarks/encode_scaling.py --sizes 1 4 28 --repeats 3
    python benchmarks/encode_scaling.py --real-config --device cuda     # Qwen2-VL-2B architecture, random bf16 weights

"ours" is `easyref.ReferenceEncoder`: the MLLM held once (its last decoder layer moved into the
aggregation layer), the vision tower (`--vision-batch-size` images per call), the trunk, then the
aggregation layer over the reference tokens' rows only. "ours" is timed cold (its vision-feature cache
emptied before each call); "ours again" is the same references with a new prompt right after, as when a
user keeps a group and tries prompts: the cached features skip the vision tower.

"naive" re-implements, in this file, what the authors' released code does (`EasyRef.get_image_embeds`):
two whole `Qwen2VLForConditionalGeneration` copies (one whose `layers[:-1]` form the trunk, one kept for
its last layer + norm only), the vision tower called once per image in a Python loop, then the trunk
and the last layer. It follows the release's real ("official") semantics: plain sequential 1-D
positions, a causal mask in the last layer too, and the final RMSNorm on the trunk output. Its last-layer
copy is loaded with our aggregator's weights and reference tokens, so both encoders compute the same
function; the `max abs diff` column checks that they do.
`--release-extras` also charges the naive path what the release's `multimodal_llm(...)` call costs on
top: logits over the whole vocabulary at every position (cast to float32) and every layer's hidden
state kept (`output_hidden_states=True`); that is negligible for the tiny vocabulary but ~2.5 GB per
call at 28 references with the real 151,936-token vocabulary.

Both encoders get the same prepared inputs (`ReferenceEncoder.prepare`), so the timed part is the
model work only. Time = median of `--repeats` calls after `--warmup` calls (torch.inference_mode), the two
encoders taking turns call by call so that both see the same machine conditions; the time ratio is
the median of the per-round ratios.
Peak memory: on CUDA `torch.cuda.max_memory_allocated` above the pre-call allocation; on CPU the
process RSS sampled every 0.5 ms above the pre-call RSS (approximate, measured in a separate untimed call).

`--real-config` builds Qwen2-VL-2B-Instruct's architecture with random weights (nothing downloaded)
and uses the tiny byte-level tokenizer (so the prompt is ~1 token per character, about 4x the real
tokenizer's count: the text part is slightly overstated, the 144 visual tokens per image are exact).
`--num-layers/--vision-depth` shrink it for a quick smoke test on CPU.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

logger = logging.getLogger("benchmarks.encode_scaling")

PROMPT = "a portrait in the same style"
PROMPT_AGAIN = "a landscape in the same style"  # about as long, so the "again" call does as much text work
SCALING_HEADERS = [
    "N refs",
    "seq len",
    "visual tokens",
    "ours ms",
    "ours again ms",
    "naive ms",
    "naive/ours time",
    "naive/ours again",
    "ours peak",
    "naive peak",
    "naive/ours peak",
    "max abs diff",
]


# ------------------------------------------------------------------------------------------------
# The release's way, re-implemented (two model copies, per-image vision loop)
class NaiveEncoder:
    """The authors' reference path: a trunk copy and a second whole copy kept for its last layer."""

    def __init__(self, trunk_model, final_model, num_tokens: int, release_extras: bool = False):
        self.trunk_model = trunk_model  # copy 1: vision tower, embeddings, layers[:-1], norm (and lm_head)
        self.final_model = final_model  # copy 2: the whole model again; only layers[-1] and norm are used
        hidden = trunk_model.config.text_config.hidden_size
        self.reference_tokens = torch.nn.Parameter(0.1 * torch.randn(num_tokens, hidden))
        self.image_token_id = trunk_model.config.image_token_id
        self.release_extras = release_extras

    @classmethod
    def from_pretrained(cls, path, num_tokens: int, dtype, device, release_extras: bool = False) -> NaiveEncoder:
        from transformers import Qwen2VLForConditionalGeneration

        def load():
            return Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(
                device
            )

        final = load()  # the release loads the model once just to keep its last layer ...
        trunk = load()  # ... and once more for the trunk
        return cls(trunk.eval(), final.eval(), num_tokens, release_extras)

    def modules(self):
        return [self.trunk_model, self.final_model, self.reference_tokens]

    def to(self, device, dtype) -> NaiveEncoder:
        self.trunk_model.to(device, dtype)
        self.final_model.to(device, dtype)
        self.reference_tokens.data = self.reference_tokens.data.to(device, dtype)
        return self

    def load_aggregator_from(self, ours) -> None:
        """Put our aggregation layer, its norm and reference tokens into copy 2 (same function, same weights)."""
        language = self.final_model.model.language_model
        with torch.no_grad():
            language.layers[-1].load_state_dict(ours.aggregator.layers[0].state_dict())
            language.norm.load_state_dict(ours.aggregator.norm.state_dict())
            self.reference_tokens.copy_(ours.aggregator.reference_tokens)

    @staticmethod
    def _causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, L) padding mask -> additive (B, 1, L, L) causal mask, as transformers 4.45 built it."""
        length = attention_mask.shape[-1]
        blocked = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).triu(1)
        blocked = blocked[None, None] | ~attention_mask.bool()[:, None, None, :]
        return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill(
            blocked, torch.finfo(dtype).min
        )

    def _layers(self, language, layers, hidden, attention_mask, keep_states: list | None):
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)  # 1-D positions
        position_embeddings = language.rotary_emb(hidden, positions)
        mask = self._causal_mask(attention_mask, hidden.dtype)
        for layer in layers:
            if keep_states is not None:
                keep_states.append(hidden)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings)
        return hidden

    def encode(self, inputs) -> torch.Tensor:
        device = self.reference_tokens.device
        input_ids = inputs.input_ids.to(device)
        attention_mask = inputs.attention_mask.to(device)
        pixel_values = inputs.pixel_values.to(device)
        grid_thw = inputs.image_grid_thw.to(device)

        language = self.trunk_model.model.language_model
        visual = self.trunk_model.model.visual
        embeds = language.embed_tokens(input_ids)
        # the release: one vision-tower call per image, in a Python loop
        features = []
        for patches, grid in zip(pixel_values.split(grid_thw.prod(-1).tolist()), grid_thw.split(1)):
            features.append(visual(patches.to(visual.get_dtype()), grid_thw=grid).pooler_output)
        features = torch.cat(features).to(embeds.dtype)
        image_mask = (input_ids == self.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_mask, features)

        # copy 1: the trunk (all layers but the last) and the final norm
        states = [] if self.release_extras else None
        hidden = self._layers(language, language.layers[:-1], embeds, attention_mask, states)
        hidden = language.norm(hidden)
        if self.release_extras:  # what `multimodal_llm(..., output_hidden_states=True)` also computed and kept
            states.append(hidden)
            logits = self.trunk_model.lm_head(hidden).float()  # noqa: F841 (kept alive like the release's output)

        # copy 2: [context ; reference tokens] through its last layer and norm
        n = self.reference_tokens.shape[0]
        tokens = self.reference_tokens.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
        hidden = torch.cat([hidden, tokens], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(hidden.shape[0], n)], dim=1)
        final_language = self.final_model.model.language_model
        hidden = self._layers(final_language, final_language.layers[-1:], hidden, attention_mask, None)
        return final_language.norm(hidden)[:, -n:]


# ------------------------------------------------------------------------------------------------
def make_images(count: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def build_tiny(args, workdir: Path, device, dtype):
    from easyref import EasyRefConfig, ReferenceEncoder
    from easyref.tiny import save_tiny_qwen2vl

    path = save_tiny_qwen2vl(workdir / "qwen2vl")
    config = EasyRefConfig(
        mllm=str(path), mllm_hidden_size=64, reference_image_size=args.image_size, max_references=max(28, *args.sizes)
    )
    start = time.perf_counter()
    ours = ReferenceEncoder.from_pretrained(path, config, dtype=dtype).to(device, dtype).eval()
    ours_load = time.perf_counter() - start
    start = time.perf_counter()
    naive = NaiveEncoder.from_pretrained(path, config.num_reference_tokens, dtype, device, args.release_extras)
    naive_load = time.perf_counter() - start
    return ours, naive, ours_load, naive_load


def build_real(args, device, dtype):
    """Qwen2-VL-2B-Instruct's architecture, random weights, the tiny tokenizer (its ids put in the config)."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from easyref import EasyRefConfig, ReferenceEncoder

    tokenizer, mllm_config = _common.qwen2vl_2b_with_tiny_tokenizer(args.num_layers, args.vision_depth)
    logger.info(
        "building Qwen2-VL-2B architecture (%d text layers, vision depth %d) with random %s weights on %s",
        args.num_layers,
        args.vision_depth,
        dtype,
        device,
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        base = Qwen2VLForConditionalGeneration._from_config(mllm_config, dtype=dtype, attn_implementation="sdpa")
    base.eval()
    # the naive encoder's two copies are copies of the same weights (the release loads the same folder twice)
    trunk_copy, final_copy = copy.deepcopy(base), copy.deepcopy(base)
    config = EasyRefConfig(
        mllm="qwen2vl-2b-random",
        mllm_hidden_size=1536,
        reference_image_size=args.image_size,
        max_references=max(28, *args.sizes),
    )
    ours = ReferenceEncoder(config, base, tokenizer, Qwen2VLImageProcessorPil()).to(device, dtype).eval()
    naive = NaiveEncoder(trunk_copy, final_copy, config.num_reference_tokens, args.release_extras)
    return ours, naive, None, None


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 28], help="numbers of references")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per point (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="EasyRefConfig.reference_image_size (default 112 tiny: 16 visual tokens/image; 336 real: 144)",
    )
    p.add_argument(
        "--input-size", type=int, default=None, help="side of the random square input images (default 2x image size)"
    )
    p.add_argument(
        "--real-config", action="store_true", help="Qwen2-VL-2B-Instruct architecture, random weights (use a GPU)"
    )
    p.add_argument("--num-layers", type=int, default=28, help="--real-config: text decoder layers (28 = real)")
    p.add_argument("--vision-depth", type=int, default=32, help="--real-config: vision blocks (32 = real)")
    p.add_argument(
        "--release-extras",
        action="store_true",
        help="naive also computes float32 logits at every position and keeps every hidden state, as the release did",
    )
    p.add_argument(
        "--vision-batch-size",
        default="auto",
        help="ours: images per vision-tower call (an integer, 'all', or 'auto': one at a time on a CPU)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.dtype = _common.parse_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    args.image_size = args.image_size or (336 if args.real_config else 112)
    args.input_size = args.input_size or 2 * args.image_size
    return args


def build_encoders(args, workdir: Path, device):
    """(ours, naive, ours load s, naive load s), naive holding our aggregator's weights so both compute the same."""
    if args.real_config:
        ours, naive, ours_load, naive_load = build_real(args, device, args.dtype)
    else:
        ours, naive, ours_load, naive_load = build_tiny(args, workdir, device, args.dtype)
    naive.to(device, args.dtype)
    naive.load_aggregator_from(ours)
    choice = args.vision_batch_size
    ours.vision_batch_size = None if choice == "all" else choice if choice == "auto" else int(choice)
    return ours, naive, ours_load, naive_load


def measure_size(ours, naive, n: int, args, device) -> tuple[list, str]:
    """(table row, how peak memory was measured) for `n` references."""
    images = make_images(n, args.input_size, args.seed + n)
    inputs = ours.prepare([images], [PROMPT]).to(device)
    again = ours.prepare([images], [PROMPT_AGAIN]).to(device)
    length = inputs.input_ids.shape[1]
    visual_tokens = int((inputs.input_ids == ours.image_token_id).sum())

    def cold():  # references never seen: every image through the vision tower
        ours.vision_cache.clear()
        return ours.encode(inputs)

    a, b = cold(), naive.encode(inputs)
    diff = (a.float() - b.float()).abs().max().item()
    del a, b
    # in each round `again` follows `ours`, so its references are the ones just seen, with a new prompt
    t = _common.interleaved_times(
        {"ours": cold, "again": lambda: ours.encode(again), "naive": lambda: naive.encode(inputs)},
        args.repeats,
        args.warmup,
        device,
    )
    m_ours, how = _common.peak_memory(cold, device)
    m_naive, _ = _common.peak_memory(lambda: naive.encode(inputs), device)
    logger.info(
        "N=%d L=%d ours %.4fs again %.4fs naive %.4fs peak %s / %s diff %.2e",
        n,
        length,
        t.median("ours"),
        t.median("again"),
        t.median("naive"),
        _common.fmt_bytes(m_ours),
        _common.fmt_bytes(m_naive),
        diff,
    )
    row = [
        n,
        length,
        visual_tokens,
        f"{t.median('ours') * 1e3:.1f}",
        f"{t.median('again') * 1e3:.1f}",
        f"{t.median('naive') * 1e3:.1f}",
        f"{t.ratio('naive', 'ours'):.2f}x",
        f"{t.ratio('naive', 'again'):.2f}x",
        _common.fmt_bytes(m_ours),
        _common.fmt_bytes(m_naive),
        f"{m_naive / m_ours:.2f}x" if m_ours > 0 else "n/a",
        f"{diff:.1e}",
    ]
    return row, how


def measure_sizes(ours, naive, args, device) -> tuple[list, str]:
    """(table rows, how peak memory was measured) over `--sizes`."""
    rows = []
    with torch.inference_mode():
        for n in args.sizes:
            row, how = measure_size(ours, naive, n, args, device)
            rows.append(row)
    return rows, how


def print_scaling_table(args, device, busy, how: str, rows: list) -> None:
    what = "Qwen2-VL-2B architecture (random weights)" if args.real_config else "tiny Qwen2-VL (easyref.tiny)"
    if args.real_config and (args.num_layers != 28 or args.vision_depth != 32):
        what += f", shrunk to {args.num_layers} text layers / vision depth {args.vision_depth}"
    print(f"### Reference encoding vs number of references: {what}\n")
    print(
        f"{_common.machine_line(device, busy)}; dtype {str(args.dtype).removeprefix('torch.')}; "
        f"reference_image_size {args.image_size}; median of {args.repeats} after {args.warmup} warm-up; "
        f"peak memory = {how}; naive release extras: {'on' if args.release_extras else 'off'}; "
        f"ours: vision_batch_size {args.vision_batch_size}\n"
    )
    print(_common.markdown_table(SCALING_HEADERS, rows))


def fmt_load(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f}"


def print_parameter_table(p_ours, p_naive, ours_load: float | None, naive_load: float | None) -> None:
    print(
        _common.markdown_table(
            ["encoder", "parameters", "parameter bytes", "load s"],
            [
                [
                    "ours (trunk + aggregation layer, MLLM held once)",
                    f"{p_ours[0]:,}",
                    _common.fmt_bytes(p_ours[1]),
                    fmt_load(ours_load),
                ],
                [
                    "naive (two whole Qwen2-VL copies)",
                    f"{p_naive[0]:,}",
                    _common.fmt_bytes(p_naive[1]),
                    fmt_load(naive_load),
                ],
                [
                    "naive / ours",
                    f"{p_naive[0] / p_ours[0]:.2f}x",
                    f"{p_naive[1] / p_ours[1]:.2f}x",
                    "n/a" if ours_load is None else f"{naive_load / ours_load:.2f}x",
                ],
            ],
        )
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    device, busy = _common.start_run(args)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ours, naive, ours_load, naive_load = build_encoders(args, Path(tmp), device)
        rows, how = measure_sizes(ours, naive, args, device)
    p_ours = _common.param_bytes([ours])
    p_naive = _common.param_bytes(naive.modules())
    print_scaling_table(args, device, busy, how, rows)
    print()
    print_parameter_table(p_ours, p_naive, ours_load, naive_load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
