"""Reference-encoder parameter memory at the real Qwen2-VL-2B-Instruct size, without allocating any weight.

Run (from the repository root; CPU, a few seconds, nothing downloaded):

    .venv/bin/python benchmarks/encoder_memory.py
    .venv/bin/python benchmarks/encoder_memory.py --dtype float16 --sizes 1 28

The model is built under `torch.device("meta")` (shapes only), wrapped into
`easyref.ReferenceEncoder`, and unique parameters are counted (a tied tensor once); bytes = params x
the dtype's size (bf16: 2). Compared:

- full model: one `Qwen2VLForConditionalGeneration`;
- ours: `ReferenceEncoder` = trunk + aggregation layer; the last decoder layer is *moved* into the
  aggregation layer, so the expected count is full - lm_head (when untied; dropped) + one RMSNorm
  (the aggregator's own copy) + the 64 x 1536 reference tokens. The script computes it from the parts and
  checks it;
- naive (two full models): the issue's description of the authors' approach, "loads the whole MLLM
  twice (one copy just to keep its last layer)", counted as two whole models held + reference tokens;
- release after its own pruning: what the released `EasyRef.__init__` actually keeps once it has
  trimmed copy 2 to `.model` with `layers[-1:]` (dropping its vision tower, embeddings and lm_head)
  and copy 1 to `layers[:-1]`: full + one norm + reference tokens. Both copies are still read from
  disk and built (load time, peak while loading), which the parameter count does not show.

The real 2B model ties lm_head to the embeddings; the "untied" columns show the same count for an
otherwise identical model with a separate lm_head (as larger Qwen2-VL models have).

A second table estimates per-call activations the release's path kept alive that ours never makes:
float32 logits over the 151,936-token vocabulary at every position (transformers 4.45's Qwen2-VL
forward computes `lm_head` on all positions and casts to float) and every layer's hidden state
(`output_hidden_states=True`). Sequence length is estimated as 146 tokens per 336-px square reference
(144 visual + vision start/end) + 60 text tokens.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

logger = logging.getLogger("benchmarks.encoder_memory")

TOKENS_PER_REFERENCE = 146  # 144 merged visual tokens of a 336-px square + <|vision_start|>, <|vision_end|>
TEXT_TOKENS = 60  # system turn + instruction + a short prompt + generation prompt (estimate)
ENCODERS = [  # (row label, key of measure()'s result)
    ("full Qwen2VLForConditionalGeneration", "full"),
    ("**ours**: ReferenceEncoder (trunk + aggregation layer)", "ours"),
    ("naive: two full models held (+ reference tokens)", "naive"),
    ("release code after its own pruning (+ reference tokens)", "release_pruned"),
]


def count(modules) -> int:
    return _common.param_bytes(modules)[0]


def decoder_layer_params(text) -> int:
    """Qwen2 decoder layer from the config: q/k/v (with bias), o (no bias), gated MLP, two RMSNorms."""
    d, i = text.hidden_size, text.intermediate_size
    head_dim = d // text.num_attention_heads
    kv = text.num_key_value_heads * head_dim
    attention = (d * d + d) + 2 * (d * kv + kv) + d * d
    mlp = 3 * d * i
    return attention + mlp + 2 * d


def measure(tied: bool, dtype: torch.dtype, num_tokens: int) -> dict:
    from transformers import Qwen2VLForConditionalGeneration

    from easyref import EasyRefConfig, ReferenceEncoder

    config = _common.qwen2vl_2b_config(tie_word_embeddings=tied)
    text = config.text_config
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config).to(dtype)
        language = model.model.language_model
        parts = {
            "vision tower": count([model.model.visual]),
            "token embeddings": count([language.embed_tokens]),
            "one decoder layer": count([language.layers[-1]]),
            f"{len(language.layers)} decoder layers": count([language.layers]),
            "final RMSNorm": count([language.norm]),
            "lm_head (separate tensor)": 0
            if model.lm_head.weight is language.embed_tokens.weight
            else count([model.lm_head]),
        }
        full = count([model])
        encoder = ReferenceEncoder(
            EasyRefConfig(mllm_hidden_size=text.hidden_size, num_reference_tokens=num_tokens),
            model,
            tokenizer=None,
            image_processor=None,
        ).to(dtype)
        ours = count([encoder])
        ours_check = {
            "aggregation layer holds the model's own last layer (moved, not copied)": encoder.aggregator.layers[0]
            is language.layers[-1],
            "trunk has all layers but the last": len(encoder.layers) == text.num_hidden_layers - 1,
        }
    analytic_layer = decoder_layer_params(text)
    reference_tokens = num_tokens * text.hidden_size
    norm = text.hidden_size
    parts_sum = sum(v for k, v in parts.items() if k not in ("one decoder layer",))
    expected_ours = full - parts["lm_head (separate tensor)"] + norm + reference_tokens
    return {
        "tied": tied,
        "parts": parts,
        "full": full,
        "parts_sum": parts_sum,
        "analytic_layer": analytic_layer,
        "ours": ours,
        "expected_ours": expected_ours,
        "naive": 2 * full + reference_tokens,
        "release_pruned": full + norm + reference_tokens,
        "checks": ours_check,
        "bytes_per_param": torch.finfo(dtype).bits // 8,
        "text": text,
    }


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32 (bytes per parameter)")
    p.add_argument("--num-tokens", type=int, default=64, help="reference tokens")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[1, 4, 8, 16, 28], help="reference counts for the activation table"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def consistency_ok(results: list[dict]) -> bool:
    """Whether the measured counts agree with the config formula and the parts; logs each disagreement."""
    ok = True
    for r in results:
        label = "tied" if r["tied"] else "untied"
        if r["parts"]["one decoder layer"] != r["analytic_layer"]:
            logger.error(
                "%s: decoder layer has %d params, the config formula gives %d",
                label,
                r["parts"]["one decoder layer"],
                r["analytic_layer"],
            )
            ok = False
        if r["parts_sum"] != r["full"]:
            logger.error("%s: parts sum to %d but the model has %d unique params", label, r["parts_sum"], r["full"])
            ok = False
        for what, good in r["checks"].items():
            if not good:
                logger.error("%s: %s: NO", label, what)
                ok = False
    return ok


def print_parts_table(tied: dict, untied: dict, b, dname: str, bpp: int) -> None:
    print(
        f"### Reference-encoder parameter memory: Qwen2-VL-2B-Instruct architecture ({dname}, "
        f"{bpp} bytes/param, meta device: no weights allocated)\n"
    )
    print(
        _common.markdown_table(
            ["component", "params (tied, real 2B)", f"{dname}", "params (untied)", f"{dname} (untied)"],
            [
                [k, f"{tied['parts'][k]:,}", b(tied["parts"][k]), f"{untied['parts'][k]:,}", b(untied["parts"][k])]
                for k in tied["parts"]
            ]
            + [
                [
                    "full model (unique tensors)",
                    f"{tied['full']:,}",
                    b(tied["full"]),
                    f"{untied['full']:,}",
                    b(untied["full"]),
                ]
            ],
        )
    )


def print_encoder_table(tied: dict, untied: dict, b, dname: str) -> None:
    rows = [
        [
            name,
            f"{tied[key]:,}",
            b(tied[key]),
            f"{tied[key] / tied['ours']:.3f}",
            f"{untied[key]:,}",
            b(untied[key]),
            f"{untied[key] / untied['ours']:.3f}",
        ]
        for name, key in ENCODERS
    ]
    print(
        _common.markdown_table(
            [
                "encoder",
                "params (tied, real 2B)",
                dname,
                "x ours",
                "params (untied)",
                f"{dname} (untied)",
                "x ours (untied)",
            ],
            rows,
        )
    )


def print_checks(results: list[dict], b, num_tokens: int) -> bool:
    """Print the expected-vs-measured lines; whether every expected count matched."""
    tied, untied = results
    d = tied["text"].hidden_size
    ok = True
    for r in results:
        label = "tied (real 2B)" if r["tied"] else "untied"
        match = r["ours"] == r["expected_ours"]
        ok &= match
        print(
            f"- {label}: expected ours = full {r['full']:,} - lm_head {r['parts']['lm_head (separate tensor)']:,} "
            f"+ aggregator norm {d:,} + reference tokens {num_tokens} x {d} = {r['expected_ours']:,}; "
            f"measured {r['ours']:,}: **{'match' if match else 'MISMATCH'}**"
        )
    print(
        f"- one decoder layer: measured {tied['parts']['one decoder layer']:,}, config formula "
        f"{tied['analytic_layer']:,}: "
        f"{'match' if tied['parts']['one decoder layer'] == tied['analytic_layer'] else 'MISMATCH'}"
    )
    for what, good in tied["checks"].items():
        print(f"- {what}: {'yes' if good else 'NO'}")
    print(
        f"- ours saves vs naive (tied): {b(tied['naive'] - tied['ours'])}; "
        f"vs the release after pruning: {b(tied['release_pruned'] - tied['ours'])} (tied), "
        f"{b(untied['release_pruned'] - untied['ours'])} (untied)"
    )
    return ok


def activation_row(n: int, text, bpp: int) -> list:
    length = TOKENS_PER_REFERENCE * n + TEXT_TOKENS
    logits = length * text.vocab_size * 4
    states = (text.num_hidden_layers - 1 + 1) * length * text.hidden_size * bpp  # 27 trunk-layer inputs + normed output
    return [
        n,
        f"~{length:,}",
        _common.fmt_bytes(logits),
        _common.fmt_bytes(states),
        _common.fmt_bytes(logits + states),
    ]


def print_activation_table(text, sizes: list[int], bpp: int, dname: str) -> None:
    print(
        "\n### Per-call activations the release's path keeps alive and ours never makes "
        f"(estimate, Qwen2-VL-2B, {dname})\n"
    )
    print(
        _common.markdown_table(
            [
                "N refs",
                "seq len",
                "float32 logits (L x 151,936)",
                "kept hidden states (27 layer inputs + normed output)",
                "total",
            ],
            [activation_row(n, text, bpp) for n in sizes],
        )
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    _common.setup_logging(args.verbose)
    dtype = _common.parse_dtype(args.dtype)
    results = [measure(tied, dtype, args.num_tokens) for tied in (True, False)]
    tied, untied = results
    bpp = tied["bytes_per_param"]
    b = lambda n: _common.fmt_bytes(n * bpp)  # noqa: E731
    dname = str(dtype).removeprefix("torch.")

    ok = consistency_ok(results)
    print_parts_table(tied, untied, b, dname, bpp)
    print()
    print_encoder_table(tied, untied, b, dname)
    print()
    ok &= print_checks(results, b, args.num_tokens)
    print_activation_table(tied["text"], args.sizes, bpp, dname)
    if not ok:
        logger.error("some checks failed (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
