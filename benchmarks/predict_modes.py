"""Does a prediction depend on the other images of the call? Each BatchNorm mode of ``Predictor``
on Lake's one-shot protocol, from the raw PNG files inside an Omniglot zip.

Tasks as ``fastadapt eval --protocol lake`` builds them (Lake, Salakhutdinov and Tenenbaum,
Science 2015): 20 characters of one alphabet the run did not train on, the support image of each
by one drawer and its query by another. Every mode classifies the 20 queries twice: all in one
``predict`` call, and each one alone. Modes:

- ``batch``: the images of a call are normalised together (the transductive protocol evaluation
  scores, where it is the published one);
- ``support``: each query with the support set's statistics (``Predictor``'s default);
- ``support+query``: each query with the statistics of the support set and itself (measured
  here only, one forward pass per query).

Prints accuracy with 95% intervals per mode and call, and the largest change of a probability
between a query given alone and among the others.

    python benchmarks/predict_modes.py RUN --root ../shared/data/omniglot [--split background_small2] [--tasks 300]
    python benchmarks/predict_modes.py RUN --root ../shared/data/omniglot --tta 8   # with test-time augmentation

``--tta VIEWS`` loads every predictor with ``views=VIEWS`` (``predict --tta``; the support+query
mode is then left out).

``--moved`` redraws every query as a user's own drawing might come: shrunk to a random 40-100% of
its size and put at a random place on its page (seeded, the same for every run), to measure how
much a run depends on where and how large a character is drawn (``--frame`` runs should not).

    python benchmarks/predict_modes.py RUN --root ../shared/data/omniglot --moved

``--layers`` (a conv4 ProtoNet run) asks where batch prediction's gain comes from: the same tasks,
the queries together, each of the four BatchNorm layers normalising them with the query set's
statistics (``Q``) or the support set's (``S``): ``SSSS`` is the support mode, ``QQQQ`` batch
prediction, ``SSSQ`` batch statistics in the last layer only.

    python benchmarks/predict_modes.py RUN --root ../shared/data/omniglot --layers
"""

from __future__ import annotations

import argparse
import io
import warnings
import zipfile
from collections import defaultdict

import numpy as np
import torch
from PIL import Image
from torch.func import vmap

from fastadapt import experiment
from fastadapt.data import Omniglot
from fastadapt.data.omniglot import OmniglotSource
from fastadapt.evaluate import confidence_interval
from fastadapt.predict import Predictor


def lake_files(root, split, trained, tasks, seed):
    """``tasks`` lists of 20 (character, support PNG bytes, query PNG bytes), within one alphabet,
    support and query by two different drawers."""
    images = Omniglot(root, split, exclude_alphabets=trained)
    by_alphabet = defaultdict(lambda: defaultdict(dict))
    for source, drawer, target in zip(images.sources, images.drawers.tolist(), images.targets.tolist()):
        by_alphabet[images.alphabets[target]][images.class_names[target]][drawer] = source
    usable = sorted(a for a, chars in by_alphabet.items() if len(chars) >= 20)
    rng = np.random.default_rng(seed)
    archives = {}

    def read(source):
        archive, member = source.rsplit(".zip:", 1)
        handle = archives.setdefault(archive, zipfile.ZipFile(archive + ".zip"))
        return handle.read(member)

    episodes = []
    for _ in range(tasks):
        alphabet = usable[rng.integers(len(usable))]
        names = sorted(by_alphabet[alphabet])
        chosen = [names[i] for i in rng.choice(len(names), 20, replace=False)]
        common = sorted(set.intersection(*(set(by_alphabet[alphabet][c]) for c in chosen)))
        first, second = rng.choice(common, 2, replace=False)
        episodes.append([(c, read(by_alphabet[alphabet][c][first]), read(by_alphabet[alphabet][c][second]))
                         for c in chosen])
    return episodes, usable


def moved(png: bytes, rng) -> bytes:
    """The drawing of ``png`` shrunk to 40-100% of its size, at a random place on a page as large."""
    page = Image.open(io.BytesIO(png)).convert("L")
    side = round(page.width * rng.uniform(0.4, 1.0))
    out = Image.new("L", page.size, 255)
    out.paste(page.resize((side, side), Image.Resampling.LANCZOS),
              (int(rng.integers(0, page.width - side + 1)), int(rng.integers(0, page.height - side + 1))))
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()


def support_plus_each(predictor: Predictor, queries) -> torch.Tensor:
    """Logits of each query normalised with the statistics of the support set and itself."""
    x = predictor.transform.to_tensor(predictor.transform.decode_all(queries, [f"q{i}" for i in range(len(queries))]))
    x = x.to(predictor.device, predictor.dtype)
    support = predictor._support_x
    with torch.no_grad():
        return vmap(lambda q: predictor.learner.predict(predictor._fast, torch.cat([support, q[None]]))[-1])(x)


LAYER_PATTERNS = ("SSSS", "QQQQ", "QSSS", "SQQQ", "SSQQ", "SSQS", "SSSQ")


def per_layer_accuracy(predictor: Predictor, episodes) -> dict:
    """Accuracy per pattern of ``LAYER_PATTERNS`` (see the module's text): conv4's blocks (conv,
    BatchNorm, ReLU) run by hand, the support set normalised by itself, the queries as the pattern
    says, then ProtoNet's rule (the nearest support embedding, one shot)."""
    learner = predictor.learner
    if learner.name != "protonet" or getattr(learner.model, "pool", None) != "stride":
        raise SystemExit("--layers: needs a ProtoNet run with conv4's strided blocks")
    layers = list(learner.model.features)
    blocks = [layers[i:i + 3] for i in range(0, 12, 3)]

    def statistics(x):
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)
        return mean, var

    def normalise(norm, x, mean, var):
        shape = (1, -1, 1, 1)
        return (x - mean) * torch.rsqrt(var + norm.eps) * norm.weight.view(shape) + norm.bias.view(shape)

    def embed(support, queries, pattern):
        for (conv, norm, relu), which in zip(blocks, pattern):
            support, queries = conv(support), conv(queries)
            mean, var = statistics(support)
            query_mean, query_var = statistics(queries) if which == "Q" else (mean, var)
            support = relu(normalise(norm, support, mean, var))
            queries = relu(normalise(norm, queries, query_mean, query_var))
        return support.mean(dim=(2, 3)), queries.mean(dim=(2, 3))

    correct = defaultdict(list)
    transform = predictor.transform
    with torch.no_grad():
        for episode in episodes:
            support = transform.to_tensor(transform.decode_all([s for _, s, _ in episode],
                                                               [f"s{i}" for i in range(len(episode))]))
            queries = transform.to_tensor(transform.decode_all([q for _, _, q in episode],
                                                               [f"q{i}" for i in range(len(episode))]))
            for pattern in LAYER_PATTERNS:
                support_embedding, query_embedding = embed(support.float(), queries.float(), pattern)
                nearest = torch.cdist(query_embedding, support_embedding).argmin(1)
                correct[pattern].append((nearest == torch.arange(len(episode))).float().mean())
    return correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--root", required=True)
    parser.add_argument("--split", default="background_small2")
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tta", type=int, default=1, help="views of each image (Predictor.load(views=))")
    parser.add_argument("--moved", action="store_true", help="queries shrunk and moved on their page (module text)")
    parser.add_argument("--layers", action="store_true",
                        help="where batch prediction's gain comes from, BatchNorm layer by layer (ProtoNet, conv4)")
    args = parser.parse_args()

    run = experiment.load_run(args.run, changes={"root": args.root}, build=False)
    trained = OmniglotSource.trained_alphabets(run.config)
    episodes, alphabets = lake_files(args.root, args.split, trained, args.tasks, args.seed)
    if args.moved:
        rng = np.random.default_rng(args.seed + 1)
        episodes = [[(c, s, moved(q, rng)) for c, s, q in episode] for episode in episodes]
    print(f"{run.path}: {run.config.algorithm.name}, {args.tasks} tasks of Lake's protocol on {', '.join(alphabets)}"
          + (f", {args.tta} views of each image" if args.tta > 1 else "")
          + (", queries shrunk and moved on their page" if args.moved else ""))
    if args.layers:
        correct = per_layer_accuracy(Predictor.load(args.run, device="cpu"), episodes)
        print(f"{'statistics of the queries, layers 1-4':<40}{'accuracy %':>18}")
        for pattern, values in correct.items():
            values = torch.stack(values)
            print(f"{pattern:<40}{100 * values.mean():>10.2f} +- {100 * confidence_interval(values):5.2f}")
        return
    predictors = {mode: Predictor.load(args.run, device="cpu", query_statistics=mode, views=args.tta)
                  for mode in Predictor.QUERY_STATISTICS}
    correct = defaultdict(list)
    largest_change = defaultdict(float)
    for episode in episodes:
        support = {c: [s] for c, s, _ in episode}
        queries = [q for _, _, q in episode]
        truth = torch.arange(len(episode))
        for mode, predictor in predictors.items():
            predictor.adapt(support)
            together = predictor.predict(queries)
            with warnings.catch_warnings():  # batch mode alone is measured on purpose; predict warns of it
                warnings.simplefilter("ignore")
                alone = [predictor.predict([q]) for q in queries]
            alone_labels = torch.cat([p.labels for p in alone])
            alone_probabilities = torch.cat([p.probabilities for p in alone])
            correct[(mode, "together")].append((together.labels == truth).float().mean())
            correct[(mode, "alone")].append((alone_labels == truth).float().mean())
            change = (together.probabilities - alone_probabilities).abs().max().item()
            largest_change[mode] = max(largest_change[mode], change)
        if args.tta == 1:
            each = support_plus_each(predictors["support"], queries)
            correct[("support+query", "alone")].append((each.argmax(-1).cpu() == truth).float().mean())
    print(f"{'mode':<15}{'call':<10}{'accuracy %':>18}{'max |dp| alone vs together':>30}")
    for (mode, call), values in correct.items():
        values = torch.stack(values)
        change = f"{largest_change[mode]:.2e}" if mode in largest_change and call == "alone" else ""
        print(f"{mode:<15}{call:<10}{100 * values.mean():>10.2f} +- {100 * confidence_interval(values):5.2f}"
              f"{change:>30}")


if __name__ == "__main__":
    main()
