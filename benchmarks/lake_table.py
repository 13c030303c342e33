"""Lake's within-alphabet one-shot protocol, every algorithm at one equal wall-clock budget.

Each algorithm meta-trains on ``images_background_small1`` alone for ``--budget`` seconds of
meta-iterations (``fastadapt train --budget``, one run at a time; ``--cosine`` anneals over the
budget), 20-way 1-shot, then ``fastadapt eval --protocol lake`` scores its final weights on
``images_background_small2``: 20-way 1-shot tasks within one alphabet, support and queries by
different drawers (Lake, Salakhutdinov and Tenenbaum, Science 2015), on the alphabets the run did
not train on (Japanese (katakana) and Sanskrit: small2's Greek and Latin are small1's, image for
image, and Tagalog has too few characters). There is no validation during training (the minimal
sets have no third part to select on), so the last weights are scored. A run whose ``lake.json``
exists is not repeated.

    python benchmarks/lake_table.py --omniglot ../shared/data/omniglot [--budget 600] [--algos maml,protonet]
    python benchmarks/lake_table.py ... --extra "--augment --group-by alphabet" --runs runs/lake-recipe
    python benchmarks/lake_table.py ... --ablation --runs runs/ablation
    python benchmarks/lake_table.py ... --search --budget 300 --runs runs/search [--variants preset,strokes]
    python benchmarks/lake_table.py ... --algos protonet --ensemble 2 --threads 1 --tta 16 --budget 3600

``--ablation`` trains ProtoNet with the ``omniglot-minimal-20w1s`` recipe (``--augment --group-by
alphabet --cosine``), then with each of its options taken out in turn, with a wider network and
with the MAML paper's rotated characters as extra classes. ``--search`` is the recipe search of
docs/results.md: each variant trains on four alphabets of ``images_background_small1`` and is
scored on Lake's protocol on the fifth, Korean, so that the test alphabets decide nothing.
``--ensemble N`` trains N runs of each algorithm at once (seeds 1 to N, ``--threads`` each: two
one-thread runs fill the two cores for the budget) and scores each and their ensemble
(``fastadapt eval RUN RUN...``: the mean of their class probabilities).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ALGOS = ("maml", "fomaml", "mamlpp", "metasgd", "anil", "reptile", "protonet", "pretrain")
TWENTY_WAY = ["--n-way", "20", "--k-shot", "1", "--k-query", "5", "--task-batch", "4", "--inner-steps", "5",
              "--inner-lr", "0.1", "--inner-steps-test", "5"]
RECIPE = ["--augment", "--group-by", "alphabet", "--cosine"]
ABLATION = {  # row name -> ProtoNet's training options
    "recipe (--augment --group-by alphabet --cosine)": RECIPE,
    "without --augment": ["--group-by", "alphabet", "--cosine"],
    "without --group-by alphabet": ["--augment", "--cosine"],
    "without --cosine": ["--augment", "--group-by", "alphabet"],
    "none of them": [],
    "recipe with --hidden 128": [*RECIPE, "--hidden", "128"],
    "without --group-by alphabet, with --rotations (rotated characters as new classes)":
        ["--augment", "--cosine", "--rotations"],
}

# The recipe search's validation: train on four alphabets of background_small1 and score Lake's
# protocol on the fifth, Korean (40 characters), so that no choice sees the test alphabets.
VALIDATION = ["--train-alphabets", "Balinese,Early_Aramaic,Greek,Latin", "--val-split", "background_small1",
              "--val-alphabets", "Korean", "--test-split", "background_small1", "--test-alphabets", "Korean"]
VALIDATION_EVAL = ["--split", "background_small1", "--alphabets", "Korean"]
PRESET = ["--rotations", "--augment", "--cosine"]  # omniglot-minimal-20w1s, as --algo protonet
SEARCH = {  # folder -> (row name, algorithm, training options, share of --budget)
    "preset": ("the preset's recipe", "protonet", PRESET, 1.0),
    "strokes": ("with --augment-strokes", "protonet", [*PRESET, "--augment-strokes"], 1.0),
    "ways40": ("40-way training tasks, 2 a meta-batch", "protonet", [*PRESET, "--n-way", "40", "--task-batch", "2"],
               1.0),
    "hidden128": ("with --hidden 128", "protonet", [*PRESET, "--hidden", "128"], 1.0),
    "pretrain-half": ("pretrain for half the budget (centroid head)", "pretrain", PRESET, 0.5),
    "pretrain-then-protonet": ("then the preset from it (--init) for the other half", "protonet",
                               [*PRESET, "--init", "{runs}/pretrain-half"], 0.5),
}


def algorithm_options(algo: str, budget: float) -> list:
    """Reptile needs several inner steps at a smaller rate (one SGD step would make it joint
    training) and its own outer step; as in benchmarks/compare_algorithms.py. MAML++'s schedules
    are counted in iterations: about a third of a budgeted run's iterations first order and the
    multi-step loss annealed over a tenth (it runs about 0.8 iterations per second here, so 200 and
    60 at 600 s, as in docs/results.md). The pretrained baseline's own test and Lake's protocol use
    its centroid head."""
    if algo == "reptile":
        return ["--inner-lr", "0.05", "--inner-steps-test", "10", "--outer-lr", "1.0"]
    if algo == "mamlpp":
        return ["--first-order-until", str(round(budget / 3)), "--multi-step-loss", str(round(budget / 10))]
    if algo == "pretrain":
        return ["--head", "centroid"]
    return []


def run(algo: str, options: list, out: Path, args, budget: float = None, validation: bool = False) -> dict:
    """Train one run for the budget (default ``--budget``) and score it on Lake's protocol (or read
    the stored score). ``validation``: train without Korean and score on Korean (``SEARCH``)."""
    result_file = out / "lake.json"
    if result_file.exists():
        return with_views(json.loads(result_file.read_text()), out, args, validation)
    budget = args.budget if budget is None else budget
    splits = VALIDATION if validation else ["--val-split", "background_small2"]
    train = [sys.executable, "-m", "fastadapt", "train", "--dataset", "omniglot", "--root", args.omniglot,
             "--train-split", "background_small1", *splits, *TWENTY_WAY,
             "--algo", algo, *algorithm_options(algo, budget), *options, "--steps", "1000000",
             "--eval-every", "1000000", "--test-episodes", "100", "--checkpoint-every", "60",
             "--budget", str(budget), "--threads", str(args.threads), "--quiet", "--out", str(out)]
    if (out / "last.pt").exists():  # an interrupted table: continue that run (or score it, if it had ended)
        train = [sys.executable, "-m", "fastadapt", "train", "--resume", str(out), "--steps", "1000000",
                 "--budget", str(budget), "--threads", str(args.threads), "--quiet"]
    print("$", shlex.join(train), flush=True)
    subprocess.run(train, check=True)
    evaluate = [sys.executable, "-m", "fastadapt", "eval", str(out / "last.pt"), "--protocol", "lake",
                *(VALIDATION_EVAL if validation else []),
                "--episodes", str(args.episodes), "--threads", str(args.threads), "--quiet"]
    print("$", shlex.join(evaluate), flush=True)
    table = subprocess.run(evaluate, check=True, capture_output=True, text=True).stdout
    steps = [line for line in table.splitlines() if re.match(r"\s+\d+\s+[\d.]+%", line)]
    found = [re.match(r"\s+(\d+)\s+([\d.]+)% ±\s+([\d.]+)", line).groups() for line in steps]
    if not found:  # one row for learners without inner steps (ProtoNet, the pretrained heads)
        found = [re.search(r"accuracy ([\d.]+)% ±\s+([\d.]+)", table).groups()]
        found = [("0", *found[0])]
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    result = {"algo": algo, "iterations": int(state["step"]), "budget_s": budget,
              "seconds": round(state["budget_used"], 1), "options": shlex.join(options),
              "alphabets": next(line for line in table.splitlines() if line.startswith("alphabets:")),
              "accuracy": [float(a) for _, a, _ in found], "ci": [float(c) for _, _, c in found]}
    result_file.write_text(json.dumps(result, indent=2))
    return with_views(result, out, args, validation)


def with_views(result: dict, out: Path, args, validation: bool) -> dict:
    """``result`` with ``"tta<VIEWS>"``: the same Lake tasks scored with ``eval --tta VIEWS``,
    added to ``lake.json`` the first time it is asked for (each number of views kept apart)."""
    if args.tta <= 1 or f"tta{args.tta}" in result:
        return result
    evaluate = [sys.executable, "-m", "fastadapt", "eval", str(out / "last.pt"), "--protocol", "lake",
                *(VALIDATION_EVAL if validation else []), "--tta", str(args.tta),
                "--episodes", str(args.episodes), "--threads", str(args.threads), "--quiet"]
    print("$", shlex.join(evaluate), flush=True)
    table = subprocess.run(evaluate, check=True, capture_output=True, text=True).stdout
    accuracy, ci = re.search(r"accuracy ([\d.]+)% ±\s+([\d.]+)", table).groups()
    result[f"tta{args.tta}"] = {"accuracy": float(accuracy), "ci": float(ci)}
    (out / "lake.json").write_text(json.dumps(result, indent=2))
    return result


def ensemble(algo: str, args) -> None:
    """``--ensemble N``: N seeds of ``algo`` trained side by side, then each and all of them scored."""
    from concurrent.futures import ThreadPoolExecutor

    folders = [Path(args.runs) / f"{algo}-seed{seed}" for seed in range(1, args.ensemble + 1)]
    options = shlex.split(args.extra)
    with ThreadPoolExecutor(args.ensemble) as pool:
        members = list(pool.map(lambda item: run(algo, [*options, "--seed", str(item[0])], item[1], args),
                                enumerate(folders, start=1)))
    result_file = Path(args.runs) / f"{algo}-ensemble{args.ensemble}.json"
    scores = json.loads(result_file.read_text()) if result_file.exists() else {}
    for views in sorted({1, args.tta}):
        if f"tta{views}" in scores:
            continue
        evaluate = [sys.executable, "-m", "fastadapt", "eval", *[str(f / "last.pt") for f in folders], "--protocol",
                    "lake", "--tta", str(views), "--episodes", str(args.episodes), "--threads",
                    str(args.threads * args.ensemble), "--quiet"]
        print("$", shlex.join(evaluate), flush=True)
        table = subprocess.run(evaluate, check=True, capture_output=True, text=True).stdout
        accuracy, ci = re.search(r"accuracy ([\d.]+)% ±\s+([\d.]+)", table).groups()
        scores[f"tta{views}"] = {"accuracy": float(accuracy), "ci": float(ci)}
        result_file.write_text(json.dumps(scores, indent=2))
    print(f"\n{algo}: {args.ensemble} seeds trained side by side for {args.budget:g} s each "
          f"({args.threads} CPU thread(s) each); Lake's protocol, {args.episodes} tasks\n")
    print(f"| run | iterations | Lake's protocol |{views_header(args)}")
    print("| --- | --- | --- |" + (" --- |" if args.tta > 1 else ""))
    for folder, r in zip(folders, members):
        print(f"| {folder.name} | {r['iterations']} | {r['accuracy'][-1]:.2f} ± {r['ci'][-1]:.2f}% |"
              + views_cell(r, args))
    plain = scores["tta1"]
    print(f"| the ensemble (eval {' '.join(f.name for f in folders)}) | - | {plain['accuracy']:.2f} ± "
          f"{plain['ci']:.2f}% |" + views_cell(scores, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--omniglot", required=True, help="folder with images_background_small{1,2}.zip")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds of meta-training per run")
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--episodes", type=int, default=600, help="Lake tasks to test on")
    parser.add_argument("--extra", default="", help="more training options, e.g. \"--augment --group-by alphabet\"")
    parser.add_argument("--ablation", action="store_true", help="ProtoNet's recipe and each option taken out")
    parser.add_argument("--search", action="store_true",
                        help="the recipe search: SEARCH's variants, trained without Korean and scored on it")
    parser.add_argument("--variants", default=",".join(SEARCH), help="with --search: which (folder names)")
    parser.add_argument("--runs", default="runs/lake", help="folder for the runs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tta", type=int, default=1, help="also score each run with eval --tta TTA (views)")
    parser.add_argument("--ensemble", type=int, default=0, metavar="N",
                        help="train N seeds of each of --algos side by side and score their ensemble")
    args = parser.parse_args()
    where = (f"Lake's protocol on background_small2 (20-way 1-shot within an alphabet, {args.episodes} tasks), "
             f"trained on background_small1 for {args.budget:g} s each ({args.threads} CPU threads)")
    if args.search:
        rows = []
        for folder in args.variants.split(","):
            name, algo, options, share = SEARCH[folder]
            options = [o.replace("{runs}", args.runs) for o in options]
            rows.append((name, run(algo, options, Path(args.runs) / folder, args, budget=args.budget * share,
                                   validation=True)))
        print(f"\nLake's protocol on held-out Korean ({args.episodes} tasks), trained on the other four alphabets "
              f"of background_small1 ({args.threads} CPU threads)\n")
        print(f"| recipe | training | Lake's protocol on Korean |{views_header(args)}")
        print("| --- | --- | --- |" + (" --- |" if args.tta > 1 else ""))
        for name, r in rows:
            print(f"| {name} | {r['iterations']} iterations in {r['seconds']:g} s | "
                  f"{r['accuracy'][-1]:.2f} ± {r['ci'][-1]:.2f}% |{views_cell(r, args)}")
        return
    if args.ensemble:
        for algo in args.algos.split(","):
            ensemble(algo, args)
        return
    if args.ablation:
        rows = [(name, run("protonet", options, Path(args.runs) / f"variant{i}", args))
                for i, (name, options) in enumerate(ABLATION.items())]
        print(f"\n{where}; ProtoNet\n")
        print("| training options | iterations | accuracy |")
        print("| --- | --- | --- |")
        for name, r in rows:
            print(f"| {name} | {r['iterations']} | {r['accuracy'][-1]:.2f} ± {r['ci'][-1]:.2f}% |")
        return
    rows = [run(algo, shlex.split(args.extra), Path(args.runs) / algo, args) for algo in args.algos.split(",")]
    print(f"\n{where}; extra: {args.extra or 'none'}\n")
    print(f"| algo | iterations | before adapting | after 1 step | after the last test step |{views_header(args)}")
    print("| --- | --- | --- | --- | --- |" + (" --- |" if args.tta > 1 else ""))
    for r in rows:
        acc, ci = r["accuracy"], r["ci"]
        if len(acc) == 1:
            print(f"| {r['algo']} | {r['iterations']} | - | - | {acc[0]:.2f} ± {ci[0]:.2f}% (no inner steps) |"
                  + views_cell(r, args))
            continue
        print(f"| {r['algo']} | {r['iterations']} | {acc[0]:.2f}% | {acc[1]:.2f} ± {ci[1]:.2f}% | "
              f"{acc[-1]:.2f} ± {ci[-1]:.2f}% ({len(acc) - 1} steps) |{views_cell(r, args)}")


def views_header(args) -> str:
    return f" with --tta {args.tta} |" if args.tta > 1 else ""


def views_cell(result: dict, args) -> str:
    tta = result.get(f"tta{args.tta}")
    return f" {tta['accuracy']:.2f} ± {tta['ci']:.2f}% |" if tta else ""


if __name__ == "__main__":
    main()
