"""Peak memory and time of the token-level KL over a large vocabulary: chunked against unchunked.

    python benchmarks/vocab_loss_memory.py                       # CPU, batch 4 and 16
    python benchmarks/vocab_loss_memory.py --device cuda

Each case (batch size x {unchunked, each chunk size}) runs in its own process, one after the other: the
forward and backward pass of ``kl_divergence`` (forward KL, ``T = 1``) between float32 student and
teacher logits of shape ``(batch, seq, vocab)``, averaged over the response positions (each
sequence's prompt, an eighth to a quarter of it, is masked out), as a causal-LM training step
computes it. Memory:

- CPU: the process's resident-set high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``) after
  the inputs exist and after the pass, with glibc's mmap threshold fixed low
  (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors go back to the system at once and the
  high-water mark follows the tensors alive at the same time;
- CUDA: ``torch.cuda.max_memory_allocated`` against ``torch.cuda.memory_allocated`` once the
  inputs exist.

"beyond inputs" is the peak minus the memory held once the inputs are allocated: the loss's own
working memory, including the gradient it returns (one input-sized tensor either way).
"total" adds the inputs (two logit tensors) and, on CPU, the interpreter. Both passes must
agree: the loss to float tolerance, and the gradient at 4,096 fixed positions and in its sum and
absolute sum. Writes ``results/vocab_loss_memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def response_mask(batch: int, seq: int, device: str):
    """Positions that predict a response token: after each row's prompt of seq/8 .. seq/4 tokens."""
    import torch

    prompt = seq // 8 + (torch.arange(batch, device=device) % 3) * (seq // 16)
    positions = torch.arange(seq, device=device)[None, :]
    return (positions >= (prompt[:, None] - 1)) & (positions < seq - 1)


def run_case(args: argparse.Namespace) -> dict:
    """One pass in this process; returns its measurements."""
    import resource

    import torch

    from kd_lightning.losses.functional import kl_divergence

    torch.set_num_threads(args.threads)
    device = args.device
    cuda = device == "cuda"

    def rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def held() -> int:
        return torch.cuda.memory_allocated() if cuda else rss()

    chunk = args.chunk_size or None
    warm = torch.randn(2, 8, 64, device=device, requires_grad=True)
    kl_divergence(warm, torch.randn(2, 8, 64, device=device), mask=response_mask(2, 8, device), chunk_size=chunk and 4).backward()
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    student = torch.randn(shape, generator=generator, device=device).mul_(3).requires_grad_(True)
    teacher = torch.randn(shape, generator=generator, device=device).mul_(3)
    mask = response_mask(args.batch, args.seq, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = held()
    start = time.perf_counter()
    loss = kl_divergence(student, teacher, 1.0, mask=mask, chunk_size=chunk)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else rss()
    grad = student.grad.reshape(-1)
    probe = torch.randint(0, grad.numel(), (4096,), generator=torch.Generator().manual_seed(1)).to(device)
    return {
        "batch": args.batch,
        "chunk_size": chunk,
        "loss": float(loss),
        "seconds": seconds,
        "peak_bytes": int(peak),
        "baseline_bytes": int(baseline),
        "beyond_inputs_bytes": int(peak - baseline),
        "input_bytes": 2 * student.numel() * student.element_size(),
        "response_positions": int(mask.sum()),
        "grad_probe": grad[probe].double().tolist(),
        "grad_sum": float(grad.double().sum()),
        "grad_abs_sum": float(grad.double().abs().sum()),
    }


def case_in_subprocess(args: argparse.Namespace, batch: int, chunk_size: int) -> dict:
    """One case in a fresh process (``chunk_size`` 0: unchunked)."""
    command = [
        sys.executable, __file__, "--case", "--batch", str(batch), "--device", args.device, "--seq", str(args.seq),
        "--vocab", str(args.vocab), "--chunk-sizes", str(chunk_size), "--threads", str(args.threads),
    ]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE.parent)
    if result.returncode != 0:
        raise RuntimeError(f"case batch={batch} chunk_size={chunk_size} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def agreement(chunked: dict, unchunked: dict) -> dict:
    """How far the chunked pass is from the unchunked one (relative to the gradient's scale)."""
    import numpy as np

    a, b = np.array(chunked["grad_probe"]), np.array(unchunked["grad_probe"])
    scale = max(np.abs(b).max(), 1e-30)
    return {
        "loss_relative_difference": abs(chunked["loss"] - unchunked["loss"]) / abs(unchunked["loss"]),
        "grad_probe_max_difference_over_max": float(np.abs(a - b).max() / scale),
        "grad_sum_difference": abs(chunked["grad_sum"] - unchunked["grad_sum"]),
        "grad_abs_sum_relative_difference": abs(chunked["grad_abs_sum"] - unchunked["grad_abs_sum"]) / unchunked["grad_abs_sum"],
    }


def report(args: argparse.Namespace, cases: dict[int, dict[int, dict]], seconds: float) -> dict:
    rows = []
    for batch, by_chunk in cases.items():
        base = by_chunk[0]
        for chunk_size, chunked in by_chunk.items():
            if chunk_size == 0:
                continue
            check = agreement(chunked, base)
            rows.append(
                {
                    "batch": batch,
                    "chunk_size": chunk_size,
                    "tokens": batch * args.seq,
                    "response_positions": base["response_positions"],
                    "logits_gb": base["input_bytes"] / 2e9,
                    "unchunked_beyond_inputs_gb": base["beyond_inputs_bytes"] / 1e9,
                    "chunked_beyond_inputs_gb": chunked["beyond_inputs_bytes"] / 1e9,
                    "beyond_inputs_ratio": chunked["beyond_inputs_bytes"] / base["beyond_inputs_bytes"],
                    "unchunked_total_gb": base["peak_bytes"] / 1e9,
                    "chunked_total_gb": chunked["peak_bytes"] / 1e9,
                    "total_ratio": chunked["peak_bytes"] / base["peak_bytes"],
                    "unchunked_seconds": base["seconds"],
                    "chunked_seconds": chunked["seconds"],
                    **check,
                    "agree": check["loss_relative_difference"] < 1e-5 and check["grad_probe_max_difference_over_max"] < 1e-4,
                }
            )
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "command": " ".join(sys.argv),
        "device": args.device,
        "vocab": args.vocab,
        "seq": args.seq,
        "threads": args.threads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_at_end": load},
        "wall_seconds": seconds,
        "rows": rows,
        "cases": {
            str(batch): {str(c): {k: v for k, v in case.items() if k != "grad_probe"} for c, case in by_chunk.items()}
            for batch, by_chunk in cases.items()
        },
    }


def markdown(result: dict) -> str:
    lines = [
        f"# Token-level KL over a {result['vocab']:,}-token vocabulary: chunked vs unchunked ({result['device']})",
        "",
        f"`{result['command']}` — sequence {result['seq']}, float32 logits, forward KL (T = 1) on the response "
        f"positions, forward + backward; {result['threads']} thread(s); load average at the end "
        f"{tuple(round(x, 1) for x in result['machine']['load_average_at_end'] or ())}.",
        "",
        "| batch | chunk (rows) | logits (each) | beyond inputs: unchunked → chunked | ratio | total peak: unchunked → chunked | ratio | time: unchunked / chunked | loss rel. diff. | grad max diff / max | agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch']} | {r['chunk_size']} | {r['logits_gb']:.2f} GB | {r['unchunked_beyond_inputs_gb']:.2f} → "
            f"{r['chunked_beyond_inputs_gb']:.2f} GB | **{r['beyond_inputs_ratio']:.2f}** | {r['unchunked_total_gb']:.2f} → "
            f"{r['chunked_total_gb']:.2f} GB | {r['total_ratio']:.2f} | {r['unchunked_seconds']:.3f} / {r['chunked_seconds']:.3f} s | "
            f"{r['loss_relative_difference']:.1e} | {r['grad_probe_max_difference_over_max']:.1e} | {'yes' if r['agree'] else 'NO'} |"
        )
    lines += [
        "",
        "\"beyond inputs\": the loss's own working memory, the gradient it returns included (one logit-sized "
        "tensor in both modes); \"total\": the peak with the two input tensors (and on CPU the interpreter). "
        "Gradients compared at 4,096 fixed positions (max difference over the largest magnitude there).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 256], help="token rows per chunk")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder of vocab_loss_memory.json/.md")
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        args.chunk_size = args.chunk_sizes[0]
        print(json.dumps(run_case(args)))
        return None
    start = time.perf_counter()
    cases: dict[int, dict[int, dict]] = {}
    for batch in args.batches:
        for chunk_size in (0, *args.chunk_sizes):
            print(f"batch {batch}, {f'chunks of {chunk_size}' if chunk_size else 'unchunked'} ...", flush=True)
            cases.setdefault(batch, {})[chunk_size] = case_in_subprocess(args, batch, chunk_size)
    result = report(args, cases, time.perf_counter() - start)
    text = markdown(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    (args.out / f"vocab_loss_memory{suffix}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"vocab_loss_memory{suffix}.md").write_text(text)
    return result


if __name__ == "__main__":
    main()
