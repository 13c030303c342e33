"""``fastadapt predict``: adapt a run to a folder of labelled support images and classify queries."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from . import common


def register(sub) -> None:
    p = sub.add_parser("predict", help="adapt to a support folder and classify query images",
                       description="Adapt a meta-trained model to labelled support images and classify query "
                                   "images. Files are read with the preprocessing stored in the checkpoint.")
    p.add_argument("checkpoint", nargs="+",
                   help="checkpoint file, or run folder (its best.pt, else last.pt); several: an ensemble, each "
                        "image classified by the mean class probabilities of every model")
    p.add_argument("--support", required=True, help="DIR/<class>/<images>, one folder per class (any number "
                                                    "of images each)")
    p.add_argument("--query", required=True, help="an image, or a folder of images to classify")
    p.add_argument("--inner-steps-test", "--steps", dest="inner_steps_test", type=int,
                   help="adaptation steps (default: the run's test steps)")
    p.add_argument("--head", choices=["centroid", "logistic", "cosine", "finetune"],
                   help="a pretrain run: score it with this head instead of the one it was trained with")
    p.add_argument("--format", choices=["csv", "json"], default="csv", help="output format (csv has a header)")
    p.add_argument("--top-k", type=int, help="also list the K most probable classes with probabilities")
    p.add_argument("--invert", action=argparse.BooleanOptionalAction, default=None,
                   help="override the stored polarity: --invert reads files as 255 - pixel (Omniglot's "
                        "black-on-white PNGs), --no-invert as they are")
    p.add_argument("--device", help="default cpu")
    p.add_argument("--query-statistics", choices=["support", "batch"], default="support",
                   help="BatchNorm for the queries: support (default) normalises each with the support set's "
                        "statistics, so an image is classified the same alone or in a folder; batch normalises "
                        "the query images together, as evaluation scores an episode")
    p.add_argument("--bn-statistics", choices=["batch", "running"], help=common.BN_STATISTICS_HELP)
    p.add_argument("--tta", type=int, default=1, metavar="VIEWS",
                   help="test-time augmentation: each support image and VIEWS-1 copies of it adapt the model, and "
                        "each query is classified by the mean probabilities of its VIEWS copies (drawn from the "
                        "image's own pixels, so alone or among others it gets the same copies; default 1: none)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..predict import Predictor, PredictorEnsemble

    if args.top_k is not None and args.top_k <= 0:
        raise ValueError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.inner_steps_test is not None and args.inner_steps_test < 0:
        raise ValueError(f"--steps must be a non-negative integer, got {args.inner_steps_test}")
    if args.tta < 1:
        raise ValueError(f"--tta must be a positive integer (views of each image; 1: none), got {args.tta}")
    options = dict(device=args.device or "cpu", inner_steps=args.inner_steps_test, bn_statistics=args.bn_statistics,
                   invert=args.invert, query_statistics=args.query_statistics, views=args.tta)
    if len(args.checkpoint) == 1:
        predictor = Predictor.load(args.checkpoint[0], head=args.head, **options)
        members = [predictor]
    else:
        predictor = PredictorEnsemble.load(args.checkpoint, head=args.head, **options)
        members = predictor.predictors
    query = Path(args.query)
    if not query.exists():
        raise FileNotFoundError(f"--query {query} does not exist")
    prediction = predictor.adapt(args.support).predict(query)
    used = " and ".join(f"{m.checkpoint}" + (f" (step {m.step})" if m.step is not None else "")
                        + f", {m.inner_steps} adaptation step(s)" for m in members)
    print(f"fastadapt predict: {'an ensemble of ' if len(members) > 1 else ''}{used} on "
          f"{len(predictor.class_names)} classes; {predictor.describe_mode()}"
          + (f"; test-time augmentation: {args.tta} views of each image ({members[0].view_augment!r})"
             if args.tta > 1 else "")
          + "".join(f"; {f'{m.checkpoint}: ' if len(members) > 1 else ''}each drawing cropped to its ink, centred, "
                    f"{m.transform.frame:g} of the image (as in training)"
                    for m in members if m.transform.frame is not None), file=sys.stderr)
    k = args.top_k or 1
    ranked = prediction.top_k(k)
    if args.format == "json":
        rows = [{"path": source, "label": name, "probability": ranked[i][0][1],
                 **({"top_k": [{"label": n, "probability": p} for n, p in ranked[i]]} if args.top_k else {})}
                for i, (source, name) in enumerate(zip(prediction.sources, prediction.names))]
        print(json.dumps(rows, indent=2))
        return 0
    writer = csv.writer(sys.stdout, lineterminator="\n")
    header = ["path", "label", "probability"]
    for rank in range(2, len(ranked[0]) + 1):
        header += [f"label_{rank}", f"probability_{rank}"]
    writer.writerow(header)
    for source, name, top in zip(prediction.sources, prediction.names, ranked):
        row = [source, name, f"{top[0][1]:.6f}"]
        for other, probability in top[1:]:
            row += [other, f"{probability:.6f}"]
        writer.writerow(row)
    return 0

