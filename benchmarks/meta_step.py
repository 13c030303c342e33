"""Time one MAML meta-iteration: fastadapt's vectorised engine against the reference-style loop.

The setting is the MAML-Pytorch reference code's Omniglot run: conv4 with 64 filters, 28x28 inputs, 5-way
1-shot, 15 queries per class, 32 tasks, 5 inner steps at lr 0.4. The loop is written like the
reference's ``Meta.forward`` (a Python loop over tasks, ``torch.autograd.grad`` per step, every step's
query loss kept) but with ``create_graph=True``, so that both compute the same second-order
gradient; the table prints the largest gradient difference. Test-time adaptation compares
``fine_tune`` with the reference's ``finetunning`` (deep copy of the network per task).

Timings alternate between the two implementations (the machine is shared and noisy) and report
medians and their ratio from one run. Peak memory is measured in a fresh subprocess per row:
``torch.cuda.max_memory_allocated`` on GPU, on CPU (Linux) the growth of the resident set's
high-water mark during one call.

``--contention N`` runs N busy processes beside the timing, as on a shared machine. ``--tuned``
gives fastadapt's side the thread count ``fastadapt train`` uses by default (``ThreadTuner``: it
times its first iterations at each count, which are run before the timed ones, and keeps the
fastest); the loop keeps torch's default count (or ``--threads``).

    python benchmarks/meta_step.py [--device cuda] [--reps 5] [--compile] [--contention N] [--threads N] [--tuned]
"""

from __future__ import annotations

import argparse
import atexit
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fastadapt  # noqa: E402
from fastadapt import MAML, TaskBatch  # noqa: E402
from fastadapt.models import conv4  # noqa: E402
from helpers import deepcopy_fine_tune, loop_meta_loss  # noqa: E402

N_WAY, K_SHOT, K_QUERY, TASKS, STEPS, LR = 5, 1, 15, 32, 5, 0.4


def start_contention(processes: int):
    """``processes`` busy Python loops beside the timing (a shared machine); stopped at exit."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]

    def stop():
        for p in busy:
            p.kill()
            p.wait()
    atexit.register(stop)
    time.sleep(0.5)


def make_batch(tasks, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_WAY)
    batch = TaskBatch(torch.rand(tasks, N_WAY * K_SHOT, 1, 28, 28, generator=g),
                      labels.repeat_interleave(K_SHOT).repeat(tasks, 1),
                      torch.rand(tasks, N_WAY * K_QUERY, 1, 28, 28, generator=g),
                      labels.repeat_interleave(K_QUERY).repeat(tasks, 1))
    return batch.to(device)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_runners(device, compile_step=False):
    """name -> (fastadapt step, loop step); each step returns the parameter gradients."""
    torch.manual_seed(0)
    model = conv4(1, N_WAY, 64, 28).to(device)
    batch = make_batch(TASKS, device)
    test_batch = make_batch(100, device, seed=1)

    def grads():
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out

    def ours(first_order, **kwargs):
        maml = MAML(model, inner_lr=LR, inner_steps=STEPS, first_order=first_order, **kwargs)
        return lambda: (maml.meta_backward(batch), grads())[1]

    def loop(first_order, per_step=True):
        def step():
            loss, _ = loop_meta_loss(model, batch, LR, STEPS, create_graph=not first_order, per_step=per_step)
            loss.backward()
            return grads()
        return step

    tuner = MAML(model, inner_lr=LR, inner_steps=STEPS)
    runners = {
        "second order": (ours(False), loop(False)),
        # the strongest plain loop: the query set scored once, after the last step
        "second order, lean loop": (ours(False), loop(False, per_step=False)),
        "first order": (ours(True), loop(True)),
        "test-time 100 tasks x 10 steps": (lambda: tuner.fine_tune(test_batch, inner_steps=10).task_accuracy,
                                           lambda: deepcopy_fine_tune(model, test_batch, LR, 10)),
    }
    if compile_step:
        runners["second order, compile=True"] = (ours(False, compile=True), loop(False))
    return runners


def tuned(step):
    """``step`` under a ``ThreadTuner``, as ``fastadapt train`` runs without ``--threads``; its
    trial iterations run here, untimed. Outside the step torch's count is restored."""
    from fastadapt.threads import ThreadTuner
    default = torch.get_num_threads()
    tuner = ThreadTuner()
    chosen = [torch.get_num_threads()]

    def run():
        torch.set_num_threads(chosen[0])
        start = time.perf_counter()
        result = step()
        tuner.step(time.perf_counter() - start)
        chosen[0] = torch.get_num_threads()
        torch.set_num_threads(default)
        return result

    while tuner.chosen is None:
        run()
    run.tuner = tuner
    return run


def max_difference(a, b):
    if isinstance(a, torch.Tensor):
        a, b = [a], [b]
    return max((x.float() - y.float().to(x.device)).abs().max().item() for x, y in zip(a, b))


def peak_memory(device, row, which):
    """Peak memory (MiB) of one call of ``which`` for ``row``, measured in a fresh process."""
    code = (f"import sys, json; sys.argv=['x']; sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
            f"import meta_step; print(json.dumps(meta_step._peak_in_process({device!r}, {row!r}, {which})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_in_process(device, row, which):
    base_row = row.replace(", compile=True", "")
    fn = make_runners(device)[base_row][which]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    # ru_maxrss survives fork+exec (it would report the parent's peak), so reset the kernel's
    # high-water mark of this process and read it back from /proc instead.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(key):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def main():
    global TASKS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each (after one warm-up)")
    parser.add_argument("--compile", action="store_true", help="also time compile=True (compiling takes minutes)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--contention", type=int, default=0, metavar="N",
                        help="run N busy processes beside the timing (CPU: a shared machine)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--tuned", action="store_true",
                        help="fastadapt's side with the thread count fastadapt train chooses by default")
    parser.add_argument("--tasks", type=int, default=32, help="tasks per meta-batch (default 32)")
    parser.add_argument("--only", help="time only the settings whose name contains this")
    args = parser.parse_args()
    TASKS = args.tasks
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.contention:
        start_contention(args.contention)

    print(f"fastadapt {fastadapt.__version__}, torch {torch.__version__}, device {args.device}, "
          f"{torch.get_num_threads()} threads" + (" (fastadapt: tuned)" if args.tuned else "")
          + f", {args.contention} busy processes beside")
    print(f"conv4-64, 28x28, {N_WAY}-way {K_SHOT}-shot, {K_QUERY} queries/class, {TASKS} tasks, "
          f"{STEPS} inner steps, lr {LR}\n")
    header = f"{'setting':34s} {'fastadapt s':>11s} {'loop s':>8s} {'speed-up':>8s} {'max |diff|':>10s}"
    if not args.no_memory:
        header += f" {'fastadapt MiB':>13s} {'loop MiB':>8s}"
    print(header)
    for name, (ours, loop) in make_runners(args.device, args.compile).items():
        if args.only and args.only not in name:
            continue
        if name.endswith("compile=True"):
            t = time.perf_counter()
            ours()
            sync(args.device)
            print(f"  (compiling took {time.perf_counter() - t:.0f} s)")
        if args.tuned:
            ours = tuned(ours)
        difference = max_difference(ours(), loop())
        times = {"ours": [], "loop": []}
        for _ in range(args.reps):
            for key, fn in (("ours", ours), ("loop", loop)):
                sync(args.device)
                t = time.perf_counter()
                fn()
                sync(args.device)
                times[key].append(time.perf_counter() - t)
        ours_s, loop_s = statistics.median(times["ours"]), statistics.median(times["loop"])
        line = f"{name:34s} {ours_s:11.3f} {loop_s:8.3f} {loop_s / ours_s:7.2f}x {difference:10.1e}"
        if args.tuned:
            line += f"  (fastadapt at {ours.tuner.chosen} threads)"
        if not args.no_memory:
            line += f" {peak_memory(args.device, name, 0):13.0f} {peak_memory(args.device, name, 1):8.0f}"
        print(line, flush=True)
    print("\nmax |diff|: largest difference of the meta-gradients (test-time: of per-step accuracies)")


if __name__ == "__main__":
    main()
