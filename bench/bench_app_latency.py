"""Does one user's long batch block everyone else's Generate? 20 simulated users of the app on the tiny
model: user 0 runs a batch of --batch-images images, users 1..19 each make --calls Generate calls (1 image)
while it runs; prints p50/p95/max of their latency, and the same with no batch running as the baseline.

    .venv/bin/python bench/bench_app_latency.py [--app PATH_TO_AN_app.py] [--batch-images 200] [--calls 3]

`--app` loads another version of app.py (e.g. `git show HEAD~1:app.py > /tmp/app_old.py`) for a before/after."""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_app(path: Path):
    spec = importlib.util.spec_from_file_location("bench_app", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_calls(url: str, user: int, calls: int, steps: int) -> list[float]:
    """One user's Generate calls, each timed."""
    from gradio_client import Client
    client = Client(url, verbose=False)
    times = []
    for k in range(calls):
        start = time.perf_counter()
        client.predict(f"Case {user}-{k}: small left pleural effusion.", "", steps, 2.0, "ddim", user * 100 + k, 1,
                       False, api_name="/generate")
        times.append(time.perf_counter() - start)
    return times


def round_of_users(url: str, users: int, calls: int, steps: int) -> list[float]:
    with cf.ThreadPoolExecutor(users) as pool:
        jobs = [pool.submit(user_calls, url, u, calls, steps) for u in range(1, users + 1)]
        return [t for j in jobs for t in j.result()]


def stats(times: list[float]) -> str:
    a = np.asarray(times)
    return (f"{len(a)} calls: p50 {np.percentile(a, 50):.2f} s, p95 {np.percentile(a, 95):.2f} s, "
            f"max {a.max():.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", type=Path, default=ROOT / "app.py")
    parser.add_argument("--batch-images", type=int, default=200)
    parser.add_argument("--users", type=int, default=19, help="users making Generate calls (plus the batch user)")
    parser.add_argument("--calls", type=int, default=3, help="Generate calls per user")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import torch
    from gradio_client import Client, handle_file

    from cxrcommon.tiny import save_tiny_pipeline
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-app-"))
    model = save_tiny_pipeline(work / "tiny-sd")
    app = load_app(args.app)
    cfg = app.AppConfig(model=str(model), port=free_port(), max_batch_images=args.batch_images)
    demo = app.launch(cfg, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{cfg.port}/"
    try:
        Client(url, verbose=False).predict("warm-up", "", args.steps, 2.0, "ddim", 0, 1, False, api_name="/generate")
        print(f"app {args.app}, tiny model, {args.users} generate users x {args.calls} calls, {args.steps} steps")
        print("no batch running:   ", stats(round_of_users(url, args.users, args.calls, args.steps)))

        prompts = work / "prompts.txt"
        prompts.write_text("".join(f"Report {i}: moderate right pleural effusion.\n" for i in range(args.batch_images)))

        def batch() -> float:
            start = time.perf_counter()
            Client(url, verbose=False).predict(handle_file(str(prompts)), 1, args.steps, 2.0, 0, "png",
                                               api_name="/batch")
            return time.perf_counter() - start

        with cf.ThreadPoolExecutor(1) as pool:
            job = pool.submit(batch)
            time.sleep(2.0)  # the batch is under way
            times = round_of_users(url, args.users, args.calls, args.steps)
            batch_s = job.result()
        print(f"during a {args.batch_images}-image batch ({batch_s:.1f} s):", stats(times))
    finally:
        demo.close()


if __name__ == "__main__":
    main()
