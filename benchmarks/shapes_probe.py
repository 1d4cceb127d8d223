"""Where a group's subject is lost: linear probes on each stage of a shapes-world EasyRef model.

Run (from the repository root, on the models `easyref bench shapes` trained):

    .venv/bin/python benchmarks/shapes_probe.py runs/bundled-model.work --methods easyref mean --kinds pick repeat

For each method and group kind, the references and prompt of held-in groups (the training subjects,
groups from a seed no benchmark uses) and of the benchmark's held-out groups go through the model,
and a linear classifier per attribute (shape, colour, pattern of the *target* subject) is fitted on
the held-in features and scored on the held-out ones, at three places:

- `context`: the MLLM trunk's output at the last text position (the end of the prompt, which attends
  to every reference and the whole instruction), averaged over a group's rows in the mean and concat
  modes;
- `tokens`: the 64 reference tokens after aggregation (and averaging / concatenation), mean-pooled;
- `projected`: the same tokens after the UNet's image projection, mean-pooled: what the decoupled
  cross-attention reads.

A column is the share of held-out groups whose attribute the probe reads right; `subject` is all three.
If `projected` reads the subject far better than the generated images do (the benchmark's identity),
the subject is lost in the UNet; if `context` reads it and `tokens` does not, in the aggregation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, markdown_table  # noqa: E402

ATTRIBUTES = ("shape", "colour", "pattern")


@torch.no_grad()
def features(pipe, groups, batch: int = 32) -> dict[str, torch.Tensor]:
    from easyref.shapes.world import render

    encoder, projection = pipe.reference_encoder, pipe.unet.encoder_hid_proj.image_projection_layers[0]
    out = {"context": [], "tokens": [], "projected": []}
    for start in range(0, len(groups), batch):
        chunk = groups[start : start + batch]
        inputs = encoder.prepare([[render(s) for s in g.references] for g in chunk], [g.prompt for g in chunk])
        hidden, _ = encoder.trunk(inputs)
        last = inputs.attention_mask.sum(-1) - 1
        rows = hidden[torch.arange(hidden.shape[0]), last]
        sizes = inputs.group_sizes or [1] * len(chunk)
        out["context"].append(torch.stack([part.mean(0) for part in rows.split(sizes)]))
        tokens = encoder(inputs=inputs)
        out["tokens"].append(tokens.mean(1))
        out["projected"].append(projection(tokens).mean(1))
    return {name: torch.cat(parts).float() for name, parts in out.items()}


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + 1e-3 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def probe_accuracy(train: dict, test: dict, train_groups, test_groups) -> dict[str, dict[str, float]]:
    from easyref.shapes.world import COLOURS, PATTERNS, SHAPES

    values = {"shape": list(SHAPES), "colour": list(COLOURS), "pattern": list(PATTERNS)}
    labels = lambda groups, a: torch.tensor([values[a].index(getattr(g.subject, a)) for g in groups])
    result = {}
    for place in train:
        mean, std = train[place].mean(0), train[place].std(0) + 1e-6
        hits = []
        for attribute in ATTRIBUTES:
            probe = fit_probe((train[place] - mean) / std, labels(train_groups, attribute), len(values[attribute]))
            with torch.no_grad():
                hits.append(probe((test[place] - mean) / std).argmax(-1) == labels(test_groups, attribute))
        result[place] = {a: 100 * h.float().mean().item() for a, h in zip(ATTRIBUTES, hits)}
        result[place]["subject"] = 100 * torch.stack(hits).all(0).float().mean().item()
    return result


def main() -> None:
    from easyref.bench.shapes import cell_groups, load_method, model_folder
    from easyref.shapes.world import make_groups

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--methods", nargs="+", default=["easyref", "mean"])
    parser.add_argument("--kinds", nargs="+", default=["pick", "repeat"])
    parser.add_argument("--seed", type=int, default=0, help="training seed of the models")
    parser.add_argument("--train-groups", type=int, default=576)
    parser.add_argument("--test-groups", type=int, default=64, help="the benchmark's held-out groups (its default 64)")
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        pipe = load_method(model_folder(args.models_dir, method, args.seed))
        for kind in args.kinds:
            distractors = 0 if kind == "pick" else 2
            train_groups = make_groups("held-in", args.train_groups, 3, distractors, seed=7000, kind=kind)
            test_groups = cell_groups((kind, "held-out", 3, distractors), args.test_groups, seed=0)
            result = probe_accuracy(
                features(pipe, train_groups), features(pipe, test_groups), train_groups, test_groups
            )
            for place, accuracy in result.items():
                rows.append([method, kind, place, *(f"{accuracy[k]:.1f}" for k in (*ATTRIBUTES, "subject"))])
    print(machine_line("cpu"))
    print(markdown_table(["method", "kind", "place", "shape %", "colour %", "pattern %", "subject %"], rows))


if __name__ == "__main__":
    main()
