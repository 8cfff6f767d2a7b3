"""Benchmark: GramModel forward + backward (with the GRAM loss) samples/s on CPU.

    python benchmarks/bench_model.py                     # tiny (batch 32) and base (batch 2)
    python benchmarks/bench_model.py --configs tiny --batch 64 --threads 2

Each step is a full training step's compute: model(batch) -> GramLoss -> backward,
with a synthetic batch of the config's shapes (uint8 frames, 16 kHz waveforms,
hash-tokenised captions). Reports the median of `--repeats` timed steps after
one warm-up step, on `--threads` intra-op threads (default 1: the machine is
shared). `base` runs a few seconds per step on a CPU; it is sized for GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gram import GramLoss, ModelConfig, build_model, count_parameters, model_config


def synthetic_batch(cfg: ModelConfig, batch_size: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Random inputs with the shapes the decoder produces for `cfg`, and the captions."""
    g = torch.Generator().manual_seed(0)
    v = cfg.vision
    words = ["red", "green", "square", "beep", "hum", "a", "and", "while", "moves"]
    texts = [
        " ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=g))
        for _ in range(batch_size)
    ]
    batch = {
        "video": torch.randint(
            0,
            256,
            (batch_size, v.num_frames, 3, v.image_size, v.image_size),
            dtype=torch.uint8,
            generator=g,
        ),
        "audio": 0.1 * torch.randn(batch_size, cfg.audio.num_samples, generator=g),
        "audio_present": torch.ones(batch_size, dtype=torch.bool),
    }
    return batch, texts


def bench(name: str, batch_size: int, repeats: int) -> dict[str, str | float]:
    cfg = model_config(name)
    model = build_model(cfg, load_pretrained=False).train()
    loss = GramLoss()
    batch, texts = synthetic_batch(cfg, batch_size)
    ids, attention = model.tokenizer(texts)
    batch["text_ids"], batch["text_attention"] = ids, attention
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss(**model(batch))["loss"].backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {
        "config": name,
        "params_M": count_parameters(model) / 1e6,
        "batch": batch_size,
        "step_s": step,
        "samples_per_s": batch_size / step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "base"])
    parser.add_argument("--batch", type=int, default=None, help="default: 32 tiny, 2 others")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), forward + backward + GRAM loss")
    print(f"{'config':<12}{'params':>10}{'batch':>7}{'step s':>10}{'samples/s':>12}")
    for name in args.configs:
        batch = args.batch or (32 if name.startswith("tiny") else 2)
        r = bench(name, batch, args.repeats)
        print(
            f"{r['config']:<12}{r['params_M']:>9.1f}M{r['batch']:>7}"
            f"{r['step_s']:>10.3f}{r['samples_per_s']:>12.1f}"
        )


if __name__ == "__main__":
    main()
