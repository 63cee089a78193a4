"""Images/s of `inference.generate` against the stock StableDiffusionPipeline, and its peak memory.

    python bench/bench_generate.py --size 64 --steps 20 --n 24 --batch 8 --rounds 2 --memory 100 1000

Same tiny SD-2 model (cxrcommon.tiny), steps, guidance and prompts for all three:
- ours: the whole generation job (`generate`), which also writes each PNG with provenance and a manifest row;
- stock loop: `pipe(prompt)` once per image (what a notebook does), images kept in memory, nothing written;
- stock batched: one `pipe(prompts)` call with every image in it.
Rounds are interleaved and the best round of each is reported (the machine may be shared).
`--procs N` runs ours as N single-threaded ranks under `accelerate launch --multi_gpu --num_processes N` (timed
from launch to exit, so interpreter start and model load count against us) and gives the stock pipeline N
torch threads: each side uses the N cores the way it can.
`--memory` runs the job in a fresh process per count at 32x32 px, 2 steps, and reports its peak RSS."""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# one-window reports only: the stock pipeline would cut a longer one to 77 tokens and so do less work
from cxrcommon.prompt_windows import count_tokens  # noqa: E402
from cxrcommon.tokenizer import clip_tokenizer  # noqa: E402

_LINES = [line for line in (ROOT / "examples" / "prompts.txt").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
PROMPTS = [line for line, n in zip(_LINES, count_tokens(clip_tokenizer(), _LINES)) if n.windows == 1]


def prompt_file(folder: Path, n_rows: int) -> Path:
    """n_rows distinct prompts (the examples, numbered), so the embedding cache is exercised too."""
    path = folder / f"prompts{n_rows}.txt"
    path.write_text("\n".join(f"{PROMPTS[i % len(PROMPTS)]} Case {i}." for i in range(n_rows)) + "\n")
    return path


def ours(model: Path, prompts: Path, out: Path, args) -> float:
    if args.procs > 1:
        return ours_launched(model, prompts, out, args)
    from inference.config import GenerateConfig
    from inference.generate import generate
    cfg = GenerateConfig(prompts=str(prompts), out=str(out), model=str(model), batch_size=args.batch,
                         steps=args.steps, guidance=4.0, height=args.size, width=args.size, compile=args.compile)
    s = generate(cfg)
    assert s.generated == args.n, s
    return s.seconds


def ours_launched(model: Path, prompts: Path, out: Path, args) -> float:
    """The job as `args.procs` ranks of one torch thread each, wall time of the whole launch; the slowest
    rank's own generation time (start-up excluded, what a long job converges to) goes to `args.steady`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.procs),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "inference.generate", "--prompts", str(prompts), "--out", str(out), "--model", str(model),
           "--batch-size", str(args.batch), "--steps", str(args.steps), "--guidance", "4.0",
           "--height", str(args.size), "--width", str(args.size), "--compile", args.compile]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=ROOT)
    seconds = time.perf_counter() - start
    assert len(list(out.glob("*.png"))) == args.n
    ranks = [re.match(r"(\d+) image\(s\) written.*; ([\d.]+) images/s", line) for line in proc.stdout.splitlines()]
    args.steady = min(args.steady, max(int(m[1]) / float(m[2]) for m in ranks if m))
    return seconds


def stock_loop(pipe, texts: list[str], args) -> float:
    start = time.perf_counter()
    for i, text in enumerate(texts):
        pipe(text, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=4.0,
             generator=torch.Generator().manual_seed(i))
    return time.perf_counter() - start


def stock_batched(pipe, texts: list[str], args) -> float:
    start = time.perf_counter()
    pipe(texts, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=4.0,
         generator=[torch.Generator().manual_seed(i) for i in range(len(texts))])
    return time.perf_counter() - start


def memory_child(n: int, model: str, folder: str, batch: int) -> None:
    """Runs in a fresh process: generate n images, print peak RSS as JSON."""
    from inference.config import GenerateConfig
    from inference.generate import generate
    prompts = prompt_file(Path(folder), n)
    s = generate(GenerateConfig(prompts=str(prompts), out=str(Path(folder) / f"mem{n}"), model=model,
                                batch_size=batch, steps=2, guidance=4.0, height=32, width=32))
    print(json.dumps({"n": s.generated, "seconds": round(s.seconds, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="image size in pixels")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n", type=int, default=24, help="images per method and round")
    ap.add_argument("--batch", type=int, default=8, help="our batch size")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile", default="off", help="ours with torch.compile in this mode (inference.sampler."
                    "COMPILE_MODES); each round is a fresh job, so its compile time counts against us")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--procs", type=int, default=1, help="ours as this many 1-thread ranks (accelerate launch); "
                                                          "the stock pipeline then gets this many threads")
    ap.add_argument("--memory", type=int, nargs="*", default=[100, 1000], help="image counts for the RSS runs")
    ap.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.procs > 1:
        args.threads = args.procs
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        return memory_child(args.child_memory, args.model, args.folder, args.batch)

    import logging

    from diffusers import StableDiffusionPipeline

    from cxrcommon.models import load_pipeline
    from cxrcommon.tiny import save_tiny_pipeline
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    model = save_tiny_pipeline(tmp / "tiny")
    pipe = load_pipeline(StableDiffusionPipeline, str(model))
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_file(tmp, args.n)
    texts = [line for line in prompts.read_text().splitlines() if line]
    load_before = os.getloadavg()
    args.steady = float("inf")
    best = {"ours": float("inf"), "stock loop": float("inf"), "stock batched": float("inf")}
    ours(model, prompts, tmp / "warm", argparse.Namespace(**{**vars(args), "n": args.n}))  # warm-up
    for r in range(args.rounds):
        best["ours"] = min(best["ours"], ours(model, prompts, tmp / f"ours{r}", args))
        best["stock loop"] = min(best["stock loop"], stock_loop(pipe, texts, args))
        best["stock batched"] = min(best["stock batched"], stock_batched(pipe, texts, args))
    rss = []
    for n in args.memory:
        cmd = [sys.executable, __file__, "--child-memory", str(n), "--model", str(model), "--folder", str(tmp),
               "--batch", str(args.batch), "--threads", str(args.threads)]
        lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
        rss.append(json.loads(lines[-1]))

    loop = args.n / best["stock loop"]
    print(f"\n### Throughput: tiny SD-2 model, {args.size}x{args.size} px, {args.steps} DDIM steps, CFG 4, "
          f"{args.n} images, best of {args.rounds} interleaved rounds\n")
    print("| method | seconds | images/s | vs stock loop |\n|---|---|---|---|")
    for name, sec in best.items():
        ranks = f", {args.procs} ranks x 1 thread, launch included" if args.procs > 1 else ""
        comp = f", compile {args.compile}" if args.compile != "off" else ""
        label = f"ours (`generate`, batch {args.batch}{ranks}{comp}, writes PNGs)" if name == "ours" else \
            ("stock `StableDiffusionPipeline`, one call per image" if name == "stock loop"
             else f"stock `StableDiffusionPipeline`, one call with all {args.n}")
        print(f"| {label} | {sec:.2f} | {args.n / sec:.2f} | {args.n / sec / loop:.2f}x |")
        if name == "ours" and args.procs > 1:
            print(f"| ours, slowest rank's generation time (start-up excluded) | {args.steady:.2f} | "
                  f"{args.n / args.steady:.2f} | {args.n / args.steady / loop:.2f}x |")
    if rss:
        print(f"\n### Peak memory of the job (fresh process each; 32x32 px, 2 steps, batch {args.batch}, "
              f"one distinct prompt per image)\n")
        print("| images | seconds | peak RSS (MiB) |\n|---|---|---|")
        for row in rss:
            print(f"| {row['n']} | {row['seconds']} | {row['peak_rss_mb']} |")
    print(f"\ncommand: `python bench/bench_generate.py {' '.join(sys.argv[1:])}`")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), load average "
          f"{load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after (shared machine)")


if __name__ == "__main__":
    main()
