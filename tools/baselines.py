"""The classical baselines of the main job: scikit-learn models on the digits, on train.py's split.

    python tools/baselines.py                  # about 10 s on 2 cores
    python tools/baselines.py --defaults-only  # scikit-learn's defaults alone, about a second (the tests)

The split is data.digits_split, the one every `python train.py` run is judged on (stratified
80/20, seed 0: 1437 training / 360 validation images); the pixels are scaled to 0-1 (divided
by 16). Each model is fitted twice: with scikit-learn's defaults (the figures the README
quotes), and with its main knobs chosen by 5-fold cross-validation on the training images
alone, so that the baselines are tuned as carefully as the main job's recipe and never see
the validation images. Prints a markdown table: validation top-1 and the time to fit.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data.py lives in the repository root
import cli  # noqa: E402
import data  # noqa: E402

BASELINES = {  # name: (the model with scikit-learn's defaults, the grid that cross-validation searches)
    "logistic regression (`max_iter=5000`)": (LogisticRegression(max_iter=5000), {"C": [0.1, 0.3, 1, 3, 10]}),
    "SVM, RBF kernel": (SVC(), {"C": [1, 3, 10, 30], "gamma": ["scale", 0.01, 0.03]}),
    "3-nearest neighbours": (KNeighborsClassifier(n_neighbors=3),
                             {"n_neighbors": [1, 3, 5, 7], "weights": ["uniform", "distance"]}),
}


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float | None]]:
    """Print the table; return {model: (val top-1 with the defaults, val top-1 tuned or None), in %}."""
    parser = cli.ArgumentParser(prog="python tools/baselines.py", description=__doc__.splitlines()[0])
    parser.add_argument("--defaults-only", action="store_true",
                        help="fit each model with scikit-learn's defaults only, no cross-validation (about a second)")
    tune = not parser.parse_args(argv).defaults_only
    pixels, labels, train_idx, val_idx = data.digits_split()
    features = pixels.reshape(len(pixels), -1) / 16
    x_train, y_train, x_val, y_val = features[train_idx], labels[train_idx], features[val_idx], labels[val_idx]
    print(f"scikit-learn digits: {len(train_idx)} training / {len(val_idx)} validation images (data.digits_split)\n")
    print("| model | defaults: val top-1 | fit | 5-fold CV on the training images: chosen | val top-1 | fit |")
    print("|---|---|---|---|---|---|")
    scores = {}
    for name, (model, grid) in BASELINES.items():
        start = time.perf_counter()
        model.fit(x_train, y_train)
        plain_seconds = time.perf_counter() - start
        plain = 100 * (model.predict(x_val) == y_val).mean()
        if not tune:
            print(f"| {name} | {plain:.1f}% | {plain_seconds:.2f} s | - | - | - |")
            scores[name] = (plain, None)
            continue
        start = time.perf_counter()
        search = GridSearchCV(model, grid, cv=5).fit(x_train, y_train)  # refits the best on all training images
        tuned_seconds = time.perf_counter() - start
        tuned = 100 * (search.predict(x_val) == y_val).mean()
        chosen = ", ".join(f"{key}={value}" for key, value in search.best_params_.items())
        print(f"| {name} | {plain:.1f}% | {plain_seconds:.2f} s | {chosen} | {tuned:.1f}% | {tuned_seconds:.1f} s |",
              flush=True)
        scores[name] = (plain, tuned)
    return scores


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
