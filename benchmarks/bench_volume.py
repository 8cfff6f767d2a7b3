"""Benchmark: `volume_matrix` + backward against the naive determinant and the matmul floor.

    python benchmarks/bench_volume.py              # B in {256, 1024, 4096}, k in {2, 3, 4}, d = 512
    python benchmarks/bench_volume.py --quick      # B in {256, 1024}

Three methods, each forward + backward of sum(V) for V [B, B]:
- gram:  `gram.volume_matrix` (closed form / Schur complement on dot products);
- naive: what the public reference code does: stack the Gram entries into
         [B, B, k, k], call `torch.linalg.det`, then sqrt(abs(det));
- floor: only the k-1 matmuls [B, d] x [d, B] (+ backward) that any method needs.
Time is the best of `--repeats` runs on one thread. Extra peak memory is the
growth of peak RSS over the inputs, each case measured in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gram import retrieval_metrics, volume_matrix


def naive_volume_matrix(anchor: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """[Na, Nb] volumes the reference way: materialise [Na, Nb, k, k] Gram matrices."""
    vecs = [F.normalize(anchor, dim=-1)] + [F.normalize(o, dim=-1) for o in others]
    na, nb = anchor.shape[0], others[0].shape[0]
    k = len(vecs)

    def entry(p: int, q: int) -> torch.Tensor:  # [Na, Nb]
        if p == 0 and q == 0:
            return (vecs[0] * vecs[0]).sum(-1)[:, None].expand(na, nb)
        if p == 0 or q == 0:
            return vecs[0] @ vecs[max(p, q)].t()
        return (vecs[p] * vecs[q]).sum(-1)[None, :].expand(na, nb)

    gram = torch.stack([torch.stack([entry(p, q) for q in range(k)], -1) for p in range(k)], -2)
    det: torch.Tensor = torch.linalg.det(gram)
    return det.abs().sqrt()


def floor(anchor: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """The k-1 dot-product planes only: the work every method must do."""
    return sum(((anchor @ o.t()).sum() for o in others), torch.zeros(()))


class Method(Protocol):
    def __call__(self, anchor: torch.Tensor, /, *others: torch.Tensor) -> torch.Tensor: ...


METHODS: dict[str, Method] = {"gram": volume_matrix, "naive": naive_volume_matrix, "floor": floor}


def child(method: str, b: int, k: int, d: int, repeats: int) -> None:
    """Run one case in this (fresh) process and print a JSON line."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fn = METHODS[method]
    inputs = [torch.randn(b, d, requires_grad=True) for _ in range(k)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.autograd.backward(fn(*inputs).sum())
    extra_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    times = []
    for _ in range(repeats):
        for t in inputs:
            t.grad = None
        start = time.perf_counter()
        torch.autograd.backward(fn(*inputs).sum())
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": min(times), "extra_mib": extra_mib}))


def run_case(method: str, b: int, k: int, d: int, repeats: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", method, str(b), str(k), str(d), str(repeats)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out: dict[str, float] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def retrieval_line(n: int, d: int) -> str:
    torch.set_num_threads(2)
    items = [torch.randn(n, d), torch.randn(n, d)]
    text = items[0] + items[1] + 2.0 * torch.randn(n, d)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    retrieval_metrics(text, items, torch.arange(n))
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return (
        f"retrieval {n} x {n} tri-modal, d={d}, 2 threads: "
        f"{seconds:.1f} s, peak RSS +{grown:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="B in {256, 1024} only")
    parser.add_argument(
        "--child", nargs=5, metavar=("METHOD", "B", "K", "D", "REPEATS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        method, b, k, d, repeats = args.child
        child(method, int(b), int(k), int(d), int(repeats))
        return
    sizes = [s for s in args.sizes if s <= 1024] if args.quick else args.sizes
    print(
        f"torch {torch.__version__}, 1 thread, d={args.dim}, best of {args.repeats}; "
        "times in ms, memory in MiB"
    )
    header = (
        f"{'B':>5} {'k':>2} | {'gram':>8} {'naive':>9} {'floor':>8} | {'naive/gram':>10} "
        f"{'gram/floor':>10} | {'mem gram':>8} {'naive':>8} {'floor':>7} {'gram/naive':>10}"
    )
    print(header)
    print("-" * len(header))
    for b in sizes:
        for k in args.ks:
            repeats = max(1, args.repeats if b <= 1024 else 2)
            r = {m: run_case(m, b, k, args.dim, repeats) for m in METHODS}
            g, n, f = (r[m]["seconds"] * 1e3 for m in ("gram", "naive", "floor"))
            mg, mn, mf = (r[m]["extra_mib"] for m in ("gram", "naive", "floor"))
            print(
                f"{b:>5} {k:>2} | {g:>8.1f} {n:>9.1f} {f:>8.1f} | {n / g:>9.1f}x "
                f"{g / f:>9.2f}x | {mg:>8.0f} {mn:>8.0f} {mf:>7.0f} {mg / max(mn, 1e-9):>9.2f}x",
                flush=True,
            )
    print(retrieval_line(10_000, 512))


if __name__ == "__main__":
    main()
