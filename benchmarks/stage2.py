"""Stage 2 speed against the arithmetic floor and against peers, all measured in one run.

    python benchmarks/stage2.py --scale small            # < 3 minutes on 2 CPU cores
    python benchmarks/stage2.py --dim 512                # ImageNet-LT shape, D = 512
    python benchmarks/stage2.py --dim 512 --rounds 5 --no-peers   # median and spread of 5 rounds
    python benchmarks/stage2.py                          # ImageNet-LT shape, D = 2048
    python benchmarks/stage2.py --profile places_lt --device cuda
    python benchmarks/stage2.py --profile inat2018_like --dim 512 --epochs 1 --float16 --no-peers
    python benchmarks/stage2.py --dim 512 --methods none --stacked crt,la_loss --epochs 1 --rounds 3
    python benchmarks/stage2.py --scale small --methods none --tuned-sweep --epochs 2 --rounds 3
    python benchmarks/stage2.py --device cuda --methods none --trace joint,crt,lws

Synthetic Gaussian class clusters with a real long-tail profile (featcache/profiles/), written
through the real cache and loaded back through the real API. For each method: wall time of
fit + the test split's logits on the device (``device_logits``, as the sweep scores them) (best of --repeats; one run for the cRT family and knn), its floor (matmul FLOPs at the sgemm rate measured
here, best of 3, plus its unavoidable passes over logits at the measured copy bandwidth) and
the ratio. Peers: an official-style Stage 2 (Python class-aware sampler feeding a DataLoader over
feature rows, autograd, a full matmul and a per-row normalisation loop per tau), scikit-learn's
LogisticRegression(class_weight="balanced") and KNeighborsClassifier(algorithm="brute").
Each method runs in a fresh child process that loads the splits itself, so its peak RSS (beyond the
features it loaded) is its own, not the import or load peak, nor an earlier method's freed memory.
With --float16 each method runs again on a float16 copy of the entry: its peak, and how many test
predictions agree with the float32 run.
With --rounds R the floors and every method are measured R times, interleaved (floors, each
method, floors, each method, ...): the table gives the median ratio and its min-max over the rounds.
With --stacked METHODS (the cRT family, lws, marc, disalign): for each, 8 trials of its search space (lr x its own
parameters; epochs E and 2 E with --epochs E, else its own epochs) fitted one by one and together
in one pass (classifiers/stacking.py), interleaved over the rounds (alternating which goes first): the stacked / separate time ratio (median,
min-max) and how many test predictions agree. With --tuned-sweep: the real tuned sweep
(classifiers.sweep.Sweeper, --budget trials per method, one seed) of the six default methods with
their search spaces (epochs replaced by E, 2 E, 3 E with --epochs E) with and without stacking,
interleaved: both wall times and their ratio. With --trace METHODS: torch.profiler over one fit
and predict of each (after a warm-up): the ops with the most self time on the device, and how many
host-device copies and synchronisations it made (where the time beyond the floor goes).
Exits non-zero only when it cannot run; prints a table and (with --json) writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classifiers import REGISTRY, create  # noqa: E402
from classifiers.base import default_methods  # noqa: E402
from classifiers.crt import CRT  # noqa: E402
from classifiers.metrics import balanced_accuracy  # noqa: E402
from classifiers.stacking import fit_together  # noqa: E402
from classifiers.tuning import DEFAULT_BUDGET, method_trials  # noqa: E402
from featcache.store import FeatureCache, writing  # noqa: E402

TAU_GRID = [round(0.1 * i, 1) for i in range(21)]


# -- data ---------------------------------------------------------------------------------------


def load_profile(name: str, shrink: int) -> dict[str, np.ndarray]:
    payload = json.loads(resources.files("featcache").joinpath(f"profiles/{name}_counts.json").read_text())
    return {split: np.maximum(1, np.asarray(payload[split]) // shrink) for split in ("train", "val", "test")}


def make_features(counts: np.ndarray, centres: np.ndarray, rng: np.random.Generator, noise: float):
    """ReLU'd Gaussian clusters, float32 throughout, written block by block."""
    labels = np.repeat(np.arange(len(counts)), counts)
    features = np.empty((len(labels), centres.shape[1]), dtype=np.float32)
    for start in range(0, len(labels), 8192):
        block = labels[start:start + 8192]
        features[start:start + len(block)] = centres[block] + noise * rng.standard_normal(
            (len(block), centres.shape[1]), dtype=np.float32)
    np.maximum(features, 0, out=features)
    return features, labels


def build_entry(root: Path, profile: dict, dim: int, seed: int = 0, float16: bool = False):
    rng = np.random.default_rng(seed)
    num_classes = len(profile["train"])
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32) * (2.0 / np.sqrt(dim) * 6)
    splits = {s: make_features(profile[s], centres, rng, noise=1.0) for s in ("train", "val", "test")}
    counts = profile["train"].astype(np.float32)
    means = np.stack([splits["train"][0][splits["train"][1] == c].mean(0) for c in range(num_classes)])
    means -= means.mean(0)  # a head-biased 'joint' classifier: centred class means, norms growing with n_j
    weight = means / np.linalg.norm(means, axis=1, keepdims=True) * (1 + np.log(counts))[:, None]
    bias = 0.3 * np.log(counts)
    for key, dtype in (("bench", "float32"), ("bench16", "float16"))[:2 if float16 else 1]:
        with writing(root, key, {"kind": "benchmark", "feature_dim": dim, "dtype": dtype,
                                 "num_classes": num_classes}) as entry:
            entry.write_classifier(weight.astype(np.float32), bias.astype(np.float32))
            for name, (X, y) in splits.items():
                entry.write_split(name, X, y)
    return splits


# -- machine rates ------------------------------------------------------------------------------


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def sgemm_rate(rows: int, dim: int, classes: int, device) -> float:
    a = torch.randn(rows, dim, device=device)
    b = torch.randn(classes, dim, device=device)
    out = torch.empty(rows, classes, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b.T, out=out), sync()
    return 2 * rows * dim * classes / best_of(lambda: (torch.mm(a, b.T, out=out), sync()), repeats=5)


def copy_bandwidth(nbytes: int, device) -> float:
    """Bytes per second of dst.copy_(src); one 'pass' over an array costs its size at this rate."""
    src = torch.empty(nbytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return nbytes / best_of(lambda: (dst.copy_(src), sync()))


def rss_bytes() -> int:
    """Resident set size of this process now (Linux: /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS while the block runs: the kernel's VmHWM after resetting it (clear_refs 5), or,
    where that reset is not allowed, the largest of /proc/self/statm sampled every millisecond."""

    def __enter__(self):
        self.start = rss_bytes()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.sampler = None
        except OSError:
            self.sampled, self.done = self.start, threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self):
        while not self.done.wait(0.001):
            self.sampled = max(self.sampled, rss_bytes())

    def __exit__(self, *exc):
        if self.sampler is None:
            status = Path("/proc/self/status").read_text()
            self.peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
        else:
            self.done.set()
            self.sampler.join()
            self.peak = max(self.sampled, rss_bytes())


# -- ours ---------------------------------------------------------------------------------------


def run_ours(name: str, params: dict, data: dict, cache: FeatureCache, device, repeats: int):
    """Wall time of fit + the test split's logits on the device (best of ``repeats``; as a sweep
    scores them, with no copy to the host), balanced top-1, the test predictions."""
    (X, y), (Xv, yv), (Xt, yt) = data["train"], data["val"], data["test"]
    counts, classifier = cache.class_counts("train"), cache.classifier
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        model = create(name, device=str(device), **params).fit(X, y, class_counts=counts, classifier=classifier,
                                                                val=(Xv, yv))
        logits = model.device_logits(Xt)
        sync(device)
        best = min(best, time.perf_counter() - began)
        predictions = logits.argmax(1).cpu().numpy()
        top1 = 100 * balanced_accuracy(predictions, yt, len(model.classes_))
        del model, logits
    return best, top1, predictions


def worker(job: dict) -> dict:
    """One method in this (fresh) process: load the splits, then time it and take its peak RSS
    beyond the loaded features."""
    device = torch.device(job["device"])
    cache = FeatureCache.open(job["entry"])
    splits = {s: cache.split(s) for s in ("train", "val", "test")}
    data = {name: (torch.from_numpy(s.features).to(device), s.labels) for name, s in splits.items()}
    with PeakRSS() as rss:
        seconds, top1, predictions = run_ours(job["method"], job["params"], data, cache, device, job["repeats"])
    np.save(job["predictions"], predictions)
    return {"seconds": seconds, "top1": top1, "peak_beyond_features": rss.peak - rss.start,
            "feature_bytes": sum(s.features.nbytes for s in splits.values())}


def in_child(job: dict) -> dict:
    """Run :func:`worker` in a fresh interpreter (a fork would inherit this one's allocator and
    OpenMP state, and forked OpenMP hangs)."""
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{job['method']} failed in its child process:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


CRT_FAMILY = tuple(name for name, cls in REGISTRY.items() if issubclass(cls, CRT))


def floors(shape: dict, rate: float, bandwidth: float, lws_epochs=5, crt_epochs=10) -> dict[str, float]:
    n, nv, nt, d, c = shape["n"], shape["nv"], shape["nt"], shape["d"], shape["c"]

    def mm(rows):
        return 2 * rows * d * c / rate

    def passes(count, rows, width=c):
        return count * rows * width * 4 / bandwidth

    crt = crt_epochs * n * 6 * d * c / rate + mm(nt)
    recalibrate = mm(n) + mm(nt) + passes(1, n) + passes(1, nt) + passes(4 * crt_epochs, n)
    return {
        **{name: crt for name in CRT_FAMILY},
        # the frozen logits once, then per draw LWS's 4 passes over its logit row; DisAlign also
        # writes the recalibrated row z' (2 passes: z' needs z, and z is needed again for the
        # gradient of alpha) and reads the drawn feature row for its confidence
        "disalign": recalibrate + passes(2 * crt_epochs, n) + passes(crt_epochs, n, d),
        "marc": recalibrate,
        "joint": mm(nt) + passes(1, nt),
        "tau": mm(nv) + mm(nt) + passes(21, nv) + passes(1, nt),
        "ncm": mm(nt) + passes(1, nt) + passes(1, n, d),
        "lws": mm(n) + mm(nt) + passes(1, n) + passes(1, nt) + passes(4 * lws_epochs, n),
        "knn": 2 * nt * n * d / rate,
    }


# -- official-style peer ------------------------------------------------------------------------


class ClassAwareSampler(torch.utils.data.Sampler):
    """As in the official classifier-balancing code: per-sample Python generator cycling over
    classes and over each class's shuffled images."""

    def __init__(self, labels: np.ndarray, num_samples: int, seed: int = 0):
        self.rng = random.Random(seed)
        self.by_class = [list(np.flatnonzero(labels == c)) for c in range(int(labels.max()) + 1)]
        self.num_samples = num_samples

    def __iter__(self):
        class_cycle = self._cycle(list(range(len(self.by_class))))
        item_cycles = [self._cycle(items) for items in self.by_class]
        for _ in range(self.num_samples):
            yield next(item_cycles[next(class_cycle)])

    def _cycle(self, items):
        while True:
            order = items[:]
            self.rng.shuffle(order)
            yield from order

    def __len__(self):
        return self.num_samples


def official_train(X, y, head, params, epochs, lr=0.2):
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(dataset, batch_size=512, sampler=ClassAwareSampler(y, len(y)))
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    criterion = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        for features, labels in loader:
            loss = criterion(head(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()


def official_sweep(data: dict, W: np.ndarray, b: np.ndarray) -> dict[str, float]:
    (X, y), (Xv, yv), (Xt, _) = data["train"], data["val"], data["test"]
    X, Xv, Xt = (t.numpy() if isinstance(t, torch.Tensor) else t for t in (X, Xv, Xt))
    Wt, bt = torch.from_numpy(W), torch.from_numpy(b)
    times = {}
    began = time.perf_counter()
    (torch.from_numpy(Xt) @ Wt.T + bt).argmax(1)
    times["joint"] = time.perf_counter() - began

    began = time.perf_counter()  # official tau script: per tau, a per-row normalisation loop, full matmuls
    scores = {}
    for tau in TAU_GRID:
        norms = torch.norm(Wt, 2, 1)
        ws = Wt.clone()
        for i in range(Wt.size(0)):
            ws[i] = ws[i] / torch.pow(norms[i], tau)
        scores[tau] = balanced_accuracy((torch.from_numpy(Xv) @ ws.T).argmax(1).numpy(), yv, len(W))
        (torch.from_numpy(Xt) @ ws.T).argmax(1)
    times["tau"] = time.perf_counter() - began

    began = time.perf_counter()
    mean = X.mean(0)
    normed = (X - mean) / np.linalg.norm(X - mean, axis=1, keepdims=True)
    centroids = np.stack([normed[y == c].mean(0) for c in range(len(W))])
    test = torch.from_numpy((Xt - mean) / np.linalg.norm(Xt - mean, axis=1, keepdims=True))
    torch.cdist(test, torch.from_numpy(centroids)).argmin(1)
    times["ncm"] = time.perf_counter() - began

    torch.manual_seed(0)
    began = time.perf_counter()
    linear = torch.nn.Linear(X.shape[1], len(W))
    official_train(X, y, linear, list(linear.parameters()), epochs=10)
    linear(torch.from_numpy(Xt)).argmax(1)
    times["crt"] = time.perf_counter() - began

    began = time.perf_counter()
    scales = torch.nn.Parameter(torch.ones(len(W)))
    official_train(X, y, lambda f: (f @ Wt.T + bt) * scales, [scales], epochs=5)
    ((torch.from_numpy(Xt) @ Wt.T + bt) * scales).argmax(1)
    times["lws"] = time.perf_counter() - began
    return times


# -- scikit-learn peers -------------------------------------------------------------------------


def sklearn_peers(data: dict, device, classes: int, queries: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    (X, y), (Xt, yt) = (data["train_np"], data["test_np"])
    keep, keep_t = y < classes, yt < classes
    out = {"logreg_classes": classes}
    began = time.perf_counter()
    model = LogisticRegression(class_weight="balanced", max_iter=100).fit(X[keep], y[keep])
    out["sklearn_logreg_s"] = time.perf_counter() - began
    out["sklearn_logreg_top1"] = 100 * balanced_accuracy(model.predict(Xt[keep_t]), yt[keep_t], classes)
    began = time.perf_counter()
    ours = create("crt", device=str(device)).fit(X[keep], y[keep])
    out["ours_crt_subset_s"] = time.perf_counter() - began
    out["ours_crt_subset_top1"] = 100 * balanced_accuracy(ours.predict(Xt[keep_t]), yt[keep_t], classes)

    rng = np.random.default_rng(0)
    picked = rng.choice(len(yt), size=min(queries, len(yt)), replace=False)
    began = time.perf_counter()
    knn = KNeighborsClassifier(n_neighbors=20, algorithm="brute", metric="cosine").fit(X, y)
    sk_pred = knn.predict(Xt[picked])
    out["knn_queries"] = len(picked)
    out["sklearn_knn_s"] = time.perf_counter() - began
    out["sklearn_knn_top1"] = 100 * balanced_accuracy(sk_pred, yt[picked], classes_all := int(y.max()) + 1)
    began = time.perf_counter()
    our_pred = create("knn", device=str(device)).fit(X, y).predict(Xt[picked])
    out["ours_knn_s"] = time.perf_counter() - began
    out["ours_knn_top1"] = 100 * balanced_accuracy(our_pred, yt[picked], classes_all)
    return out


def summarise(rounds: list[dict]) -> dict:
    """A method's rounds in one line: median seconds, floor and ratio, the ratio's min-max, the
    largest extra memory; float16 and top-1 from the first round."""
    ratios = [r["ratio"] for r in rounds]
    out = {key: float(np.median([r[key] for r in rounds])) for key in ("seconds", "floor_s", "ratio")}
    out.update(ratio_min=min(ratios), ratio_max=max(ratios), top1=rounds[0]["top1"],
               extra_over_features=max(r["extra_over_features"] for r in rounds))
    if "float16" in rounds[0]:
        out["float16"] = rounds[0]["float16"]
    return out


# -- stacked trials -------------------------------------------------------------------------------


def stack_trials(name: str, epochs: int | None, count: int = 8) -> list[dict]:
    """``count`` trials of ``name``'s search space; with ``epochs`` E its epochs are E and 2 E, and
    a space of fewer points gets its lr dimension widened (x 1/2 and x 2 between the three)."""
    overrides = {"epochs": [epochs, 2 * epochs]} if epochs is not None else {}
    trials = method_trials(name, overrides, count).params
    if len(trials) < count:
        lr = REGISTRY[name].defaults()["lr"]
        overrides["lr"] = [lr / 4, lr / 2, lr, lr * 2, lr * 4]
        trials = method_trials(name, overrides, count).params
    return trials


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stacked_round(name: str, trials: list[dict], cache: FeatureCache, data: dict, device, stacked_first: bool) -> dict:
    """One interleaved round: the trials fitted one by one and fitted together (in that order, or
    the other with ``stacked_first``); seconds of each and the share of test predictions (over all
    trials) the two agree on."""
    (X, y), (Xt, _) = data["train"], data["test"]
    kwargs = {"class_counts": cache.class_counts("train"), "classifier": cache.classifier}

    def timed(fit):
        began = time.perf_counter()
        fitted = fit()
        sync(device)
        return fitted, time.perf_counter() - began

    separately = lambda: [create(name, device=str(device), **p).fit(X, y, **kwargs) for p in trials]  # noqa: E731
    together = lambda: fit_together([create(name, device=str(device), **p) for p in trials], X, y, **kwargs)  # noqa: E731
    if stacked_first:
        (b, stacked_s), (a, separate_s) = timed(together), timed(separately)
    else:
        (a, separate_s), (b, stacked_s) = timed(separately), timed(together)
    agree = np.mean([np.mean(x.predict(Xt) == z.predict(Xt)) for x, z in zip(a, b)])
    return {"separate_s": separate_s, "stacked_s": stacked_s, "ratio": stacked_s / separate_s,
            "agreement": float(agree)}


def tuned_sweep_round(cache_path: Path, device, epochs: int | None, budget: int, stack: bool, out: Path) -> float:
    """Seconds of the tuned sweep of the default methods on the entry (fresh results each time)."""
    from classifiers.sweep import Representation, Sweeper, SweepSpec

    methods = default_methods()
    params = {m: {"epochs": [epochs, 2 * epochs, 3 * epochs]} for m in methods
              if epochs is not None and "epochs" in REGISTRY[m].info.search_space}
    spec = SweepSpec(methods, params, [0], device=str(device), tune=True, budget=budget, stack=stack)
    began = time.perf_counter()
    with Sweeper([Representation("bench", FeatureCache.open(cache_path))], spec, out, mode="overwrite") as sweeper:
        for _ in sweeper:
            pass
    return time.perf_counter() - began


def trace(name: str, cache: FeatureCache, data: dict, device, epochs: int | None, rows: int = 15) -> str:
    """torch.profiler over one fit + decision_function of ``name`` (after a warm-up fit): the ops
    that took the most time on the device (self time), and how many host-device copies and
    synchronisations the fit made: where the time beyond the floor goes."""
    from torch.profiler import ProfilerActivity, profile

    (X, y), (Xt, _) = data["train"], data["test"]
    params = {p: "auto" for p in REGISTRY[name].info.chosen_on_val}  # as measure() runs them
    if epochs is not None and "epochs" in REGISTRY[name].param_names():
        params["epochs"] = epochs
    kwargs = {"class_counts": cache.class_counts("train"), "classifier": cache.classifier, "val": data["val"]}
    run = lambda: create(name, device=str(device), **params).fit(X, y, **kwargs).device_logits(Xt)  # noqa: E731
    run(), sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        run(), sync(device)
    events = profiler.key_averages()
    copies = sum(e.count for e in events if "memcpy" in e.key.lower() or e.key in ("aten::_to_copy", "aten::copy_"))
    syncs = sum(e.count for e in events if "synchronize" in e.key.lower() or e.key == "aten::item")
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (f"{name}: {copies} copy events, {syncs} synchronisations / item() calls\n"
            + events.table(sort_by=key, row_limit=rows))


def spread(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": min(values), "max": max(values)}


# -- main ---------------------------------------------------------------------------------------


def measure(name: str, args, tmp: Path, floor_s: float, logits_bytes: int, results: dict, float16: bool) -> dict:
    """One method in a child process: seconds, ratio to ``floor_s``, extra memory; with ``float16``
    also on the float16 entry, and how many test predictions agree."""
    params = {param: "auto" for param in REGISTRY[name].info.chosen_on_val}
    if args.epochs is not None and "epochs" in REGISTRY[name].param_names():
        params["epochs"] = args.epochs
    job = {"entry": str(tmp / "bench"), "method": name, "params": params, "device": args.device,
           "repeats": 1 if name in CRT_FAMILY + ("knn",) else args.repeats, "predictions": str(tmp / "predictions32.npy")}
    m = in_child(job)
    results["feature_bytes"] = feature_bytes = m.pop("feature_bytes")
    m.update(floor_s=floor_s, ratio=m["seconds"] / floor_s,
             extra_over_features=(m["peak_beyond_features"] - logits_bytes) / feature_bytes)
    if float16:
        half = in_child({**job, "entry": str(tmp / "bench16"), "predictions": str(tmp / "predictions16.npy")})
        results["feature_bytes16"] = half.pop("feature_bytes")
        agree = np.load(tmp / "predictions16.npy") == np.load(tmp / "predictions32.npy")
        m["float16"] = {**half, "agreement": float(agree.mean()),
                        "extra_over_features": (half["peak_beyond_features"] - logits_bytes) / feature_bytes}
    return m


def measure_stacking(args, tmp: Path, device, results: dict) -> None:
    """The --stacked and --tuned-sweep rows, each over --rounds interleaved rounds (the order of
    stacked and separate alternating), denormals flushed as the sweep does."""
    torch.set_flush_denormal(True)
    cache = FeatureCache.open(tmp / "bench")
    splits = {s: cache.split(s) for s in ("train", "test")}
    data = {name: (torch.from_numpy(s.features).to(device), s.labels) for name, s in splits.items()}
    stacked = {name: {"trials": stack_trials(name, args.epochs), "rounds": []}
               for name in (args.stacked.split(",") if args.stacked else [])}
    sweeps = {"stacked": [], "separate": []}
    for round_ in range(args.rounds):
        for name, entry in stacked.items():
            entry["rounds"].append(stacked_round(name, entry["trials"], cache, data, device, round_ % 2 == 1))
            print(f"round {round_ + 1}, {name} stacked: {json.dumps(entry['rounds'][-1])}", file=sys.stderr, flush=True)
        if args.tuned_sweep:
            order = ("stacked", "separate") if round_ % 2 == 0 else ("separate", "stacked")
            for kind in order:
                sweeps[kind].append(tuned_sweep_round(tmp / "bench", device, args.epochs, args.budget,
                                                      kind == "stacked", tmp / f"sweep-{kind}"))
            print(f"round {round_ + 1}, tuned sweep: stacked {sweeps['stacked'][-1]:.1f} s, separate "
                  f"{sweeps['separate'][-1]:.1f} s", file=sys.stderr, flush=True)
    for entry in stacked.values():
        rounds = entry["rounds"]
        entry.update(ratio=spread([r["ratio"] for r in rounds]), separate_s=spread([r["separate_s"] for r in rounds]),
                     stacked_s=spread([r["stacked_s"] for r in rounds]),
                     agreement=min(r["agreement"] for r in rounds))
    results["stacked"] = stacked
    if args.tuned_sweep:
        ratios = [a / b for a, b in zip(sweeps["stacked"], sweeps["separate"])]
        results["tuned_sweep"] = {"methods": default_methods(), "budget": args.budget, "epochs": args.epochs,
                                  "stacked_s": spread(sweeps["stacked"]), "separate_s": spread(sweeps["separate"]),
                                  "ratio": spread(ratios)}


def at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="imagenet_lt_like", choices=["imagenet_lt_like", "places_lt",
                                                                          "inat2018_like"])
    parser.add_argument("--scale", default="full", choices=["full", "small"],
                        help="small: class counts / 4 and D = 256 (a quick run)")
    parser.add_argument("--dim", type=int, help="feature dimension (default 2048; 256 with --scale small)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--methods", default=",".join(default_methods()),
                        help="comma-separated (default: those registered default=True, %(default)s); also "
                             f"{', '.join(m for m in CRT_FAMILY if m not in default_methods())}, disalign, marc")
    parser.add_argument("--epochs", type=int, help="epochs of the cRT family, lws, disalign and marc "
                        "(default: each method's own; the floors follow)")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs (the cRT family and knn: 1)")
    parser.add_argument("--rounds", type=at_least_one, default=1,
                        help="measure the floors and every method this many times, interleaved (floors, "
                             "each method, floors, each method, ...): median ratio and its min-max")
    parser.add_argument("--float16", action="store_true",
                        help="also run each method on a float16 copy of the entry: peak RSS, agreement")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--stacked", metavar="METHODS",
                        help="comma-separated stackable methods (the cRT family, lws, marc, disalign): 8 trials each, stacked vs separate")
    parser.add_argument("--tuned-sweep", action="store_true",
                        help="the tuned sweep of the six default methods, with and without stacking")
    parser.add_argument("--trace", metavar="METHODS",
                        help="comma-separated: torch.profiler over one fit + predict of each (its top ops, copies, syncs)")
    parser.add_argument("--budget", type=at_least_one, default=DEFAULT_BUDGET,
                        help="trials per method of --tuned-sweep (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torch.set_flush_denormal(True)  # as the Sweeper does: denormal softmax tails slow the CPU several-fold
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    shrink = 4 if args.scale == "small" else 1
    dim = args.dim or (256 if args.scale == "small" else 2048)
    profile = load_profile(args.profile, shrink)
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        generated = build_entry(Path(tmp), profile, dim, float16=args.float16)
        build_s = time.perf_counter() - began
        np.save(Path(tmp) / "train.npy", generated["train"][0])
        del generated
        load_s = best_of(lambda: FeatureCache.open(Path(tmp) / "bench").split("train"))
        npload_s = best_of(lambda: np.load(Path(tmp) / "train.npy"))
        (Path(tmp) / "train.npy").unlink()
        shape = {"n": int(profile["train"].sum()), "nv": int(profile["val"].sum()), "nt": int(profile["test"].sum()),
                 "d": dim, "c": len(profile["train"])}
        results = {"shape": shape, "device": str(device), "build_s": build_s, "split_load_s": load_s,
                   "npload_s": npload_s, "epochs": args.epochs, "rounds": args.rounds, "machine": [], "methods": {}}
        logits_bytes = shape["nt"] * shape["c"] * 4
        names = [] if args.methods == "none" else args.methods.split(",")
        for round_ in range(args.rounds):  # interleaved: each round measures its own floors
            rate = sgemm_rate(shape["nt"], dim, shape["c"], device)
            bandwidth = copy_bandwidth(256 << 20, device)
            results["machine"].append({"sgemm_gflops": rate / 1e9, "copy_gbps": bandwidth / 1e9})
            floor = floors(shape, rate, bandwidth, **({"lws_epochs": args.epochs, "crt_epochs": args.epochs}
                                                      if args.epochs is not None else {}))
            for name in names:
                m = measure(name, args, Path(tmp), floor[name], logits_bytes, results, float16=args.float16 and round_ == 0)
                results["methods"].setdefault(name, {"rounds": []})["rounds"].append(m)
                print(f"round {round_ + 1}, {name}: {json.dumps(m)}", file=sys.stderr, flush=True)
        if args.stacked or args.tuned_sweep:
            measure_stacking(args, Path(tmp), device, results)
        if args.trace:
            cache = FeatureCache.open(Path(tmp) / "bench")
            data = {s: (torch.from_numpy(cache.split(s).features).to(device), cache.split(s).labels)
                    for s in ("train", "val", "test")}
            results["traces"] = {name: trace(name, cache, data, device, args.epochs) for name in args.trace.split(",")}
        for name, entry in results["methods"].items():
            entry.update(summarise(entry["rounds"]))
        results["sgemm_gflops"] = float(np.median([m["sgemm_gflops"] for m in results["machine"]]))
        results["copy_gbps"] = float(np.median([m["copy_gbps"] for m in results["machine"]]))
        results["logits_bytes"] = logits_bytes
        if not args.no_peers and device.type != "cpu":
            print("peers: they run on the CPU, so they are compared only with --device cpu", file=sys.stderr)
        elif not args.no_peers:
            cache = FeatureCache.open(Path(tmp) / "bench")
            splits = {s: cache.split(s) for s in ("train", "val", "test")}
            data = {name: (torch.from_numpy(s.features).to(device), s.labels) for name, s in splits.items()}
            data["train_np"] = (splits["train"].features, splits["train"].labels)
            data["test_np"] = (splits["test"].features, splits["test"].labels)
            official = official_sweep({k: data[k] for k in ("train", "val", "test")}, *cache.classifier)
            results["official"] = official
            ours_sweep = sum(results["methods"][m]["seconds"] for m in official if m in results["methods"])
            results["sweep_speedup"] = sum(official.values()) / ours_sweep if ours_sweep else None
            results["sklearn"] = sklearn_peers(data, device, classes=min(100, shape["c"]),
                                               queries=2000 if args.scale == "full" else 500)
    report(results)
    report_stacking(results)
    for text in results.get("traces", {}).values():
        print("\n" + text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def report_stacking(r: dict) -> None:
    if r.get("stacked"):
        print(f"\nstacked trials ({r['rounds']} interleaved rounds; ratio = stacked / separate, median and min-max):")
        print(f"{'method':<10}{'trials':>7}{'separate s':>12}{'stacked s':>11}{'ratio':>7}{'min-max':>12}{'agree %':>9}")
        for name, m in r["stacked"].items():
            q = m["ratio"]
            print(f"{name:<10}{len(m['trials']):>7}{m['separate_s']['median']:>12.2f}{m['stacked_s']['median']:>11.2f}"
                  f"{q['median']:>7.2f}{q['min']:>7.2f}-{q['max']:<4.2f}{100 * m['agreement']:>9.2f}")
    if r.get("tuned_sweep"):
        t = r["tuned_sweep"]
        epochs = f", epochs {t['epochs']}, {2 * t['epochs']}, {3 * t['epochs']}" if t["epochs"] else ""
        print(f"\ntuned sweep of {','.join(t['methods'])} (budget {t['budget']}, one seed{epochs}): stacked "
              f"{t['stacked_s']['median']:.1f} s, separate {t['separate_s']['median']:.1f} s, ratio "
              f"{t['ratio']['median']:.2f} ({t['ratio']['min']:.2f}-{t['ratio']['max']:.2f}) over {r['rounds']} rounds")


def report_methods(r: dict) -> None:
    if r["epochs"] is not None:
        print(f"epochs: {r['epochs']} for the cRT family, lws, disalign and marc (reduced; the floors follow)")
    half = "feature_bytes16" in r
    spread = r["rounds"] > 1
    print(f"{'method':<10}{'seconds':>10}{'floor s':>10}{'ratio':>8}" + (f"{'min-max':>12}" if spread else "") +
          f"{'top1':>8}{'extra':>8}" +
          (f"{'f16 extra':>10}{'f16 s':>8}{'agree %':>9}" if half else "") +
          (f"{'official':>11}{'speedup':>9}" if "official" in r else ""))
    for name, m in r["methods"].items():
        line = (f"{name:<10}{m['seconds']:>10.3f}{m['floor_s']:>10.3f}{m['ratio']:>8.2f}"
                + (f"{m['ratio_min']:>7.2f}-{m['ratio_max']:<4.2f}" if spread else "")
                + f"{m['top1']:>8.1f}{m['extra_over_features']:>7.2f}x")
        if half:
            h = m["float16"]
            line += f"{h['extra_over_features']:>9.2f}x{h['seconds']:>8.2f}{100 * h['agreement']:>9.2f}"
        if name in r.get("official", {}):
            line += f"{r['official'][name]:>11.3f}{r['official'][name] / m['seconds']:>8.1f}x"
        print(line)
    if spread:
        print(f"\nseconds, floor and ratio: medians of {r['rounds']} interleaved rounds (each with its own floors); "
              "min-max: the ratio's range over the rounds")
    print(f"\nextra: each method's peak RSS in its own process beyond the splits it loaded and the returned "
          f"test logits ({r['logits_bytes'] / 2**20:.0f} MiB), as a multiple of the float32 features "
          f"({r['feature_bytes'] / 2**20:.0f} MiB)")
    if half:
        print(f"f16: the same on the float16 entry, whose features take {r['feature_bytes16'] / 2**20:.0f} MiB; "
              f"agree: test predictions equal to the float32 run's")


def report(r: dict) -> None:
    s = r["shape"]
    print(f"shape: train {s['n']}, val {s['nv']}, test {s['nt']}, D {s['d']}, C {s['c']} on {r['device']}")
    print(f"machine: sgemm {r['sgemm_gflops']:.1f} GFLOP/s (best of 5), copy {r['copy_gbps']:.1f} GB/s"
          + (f" (medians of {r['rounds']} rounds: sgemm {min(m['sgemm_gflops'] for m in r['machine']):.0f}-"
             f"{max(m['sgemm_gflops'] for m in r['machine']):.0f})" if r["rounds"] > 1 else ""))
    print(f"cache: wrote the entry in {r['build_s']:.1f} s; train split loads in {r['split_load_s']:.3f} s vs "
          f"np.load {r['npload_s']:.3f} s ({r['npload_s'] / r['split_load_s']:.2f}x np.load speed)")
    print()
    if r["methods"]:
        report_methods(r)
    if "official" in r:
        print(f"{','.join(r['official'])} sweep: {r['sweep_speedup']:.2f}x faster than the official-style peer")
        k = r["sklearn"]
        print(f"sklearn LogisticRegression(balanced), {k['logreg_classes']} classes: {k['sklearn_logreg_s']:.1f} s "
              f"(top1 {k['sklearn_logreg_top1']:.1f}) vs our crt {k['ours_crt_subset_s']:.1f} s "
              f"(top1 {k['ours_crt_subset_top1']:.1f})")
        print(f"sklearn KNeighborsClassifier(brute, cosine, k=20), {k['knn_queries']} queries: {k['sklearn_knn_s']:.2f} s "
              f"(top1 {k['sklearn_knn_top1']:.1f}) vs our faiss kNN {k['ours_knn_s']:.2f} s (top1 {k['ours_knn_top1']:.1f})")


if __name__ == "__main__":
    sys.exit(main())
