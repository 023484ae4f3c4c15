"""Helpers of bench/side_by_side.sh.

  config SEED LAYERS [EXTRA.toml]...
                                    prints tessera's run configuration: the seed and the layers,
                                    with the settings of each EXTRA (a recipe) merged over them
  partial-labels STORE FRACTION SEED
                                    writes obs/cell_type_partial: cell_type kept in FRACTION of
                                    the cells (drawn with SEED), missing elsewhere
  report WORK ARMS SEED...          prints each arm's per-seed results (ARMS: comma-separated run
                                    folders of each seed, `scvi` for scvi-tools, the first arm
                                    tessera's), their mean ± sd and the -ELBO gap of each tessera
                                    arm to scvi-tools (and, where the store has
                                    cell_type_partial, each arm's accuracy of obs/prediction_<arm>
                                    on the unlabelled cells), then the paired differences of
                                    each tessera arm from scvi-tools; writes WORK/summary.json
  paired WORK...                    pools the runs of several reports (their summary.json) and
                                    prints the paired differences tessera - scvi-tools: mean, 95%
                                    confidence interval (Student's t) and the runs where tessera is
                                    better, for the validation -ELBO and the scIB scores
  multimodal WORK KINDS SEED...     the same for bench/multimodal_side_by_side.sh: per store
                                    (KINDS: cite,multiome), tessera (and its recipe arm) against
                                    totalVI / MultiVI: cells/s, scIB metrics, imputation of the
                                    missing modality; writes WORK/summary.json
"""

import csv
import json
import os
import statistics
import sys
import tomllib

SCIB = [("silhouette_label", "cell-type ASW"), ("nmi", "NMI"), ("ari", "ARI"), ("clisi", "cLISI"),
        ("silhouette_batch", "batch ASW"), ("ilisi", "iLISI"), ("graph_connectivity", "graph connectivity"),
        ("bio_conservation", "bio conservation"), ("batch_correction", "batch correction"), ("total", "scIB total")]
ROWS = [("cells_per_s", "training cells/s", "{:.0f}"), ("validation_elbo", "validation -ELBO", "{:.2f}"),
        ("validation_elbo_last10", "  mean of last 10 epochs", "{:.2f}"),
        ("validation_reconstruction", "  reconstruction", "{:.2f}"), ("validation_kl", "  KL", "{:.2f}"),
        ("jumpiness", "  |Δ| per epoch, last 20", "{:.2f}"),
        ("train_elbo_last10", "training -ELBO, last 10", "{:.2f}")] + [(k, n, "{:.4f}") for k, n in SCIB] + [
        ("label_accuracy", "accuracy, unlabelled cells", "{:.4f}"),
        ("in_scvi_latent_diff", "in scvi-tools: latent max|Δ|", "{:.1e}"),
        ("in_scvi_elbo_diff", "in scvi-tools: -ELBO Δ", "{:.2f}")]
PARTIAL = "cell_type_partial"


def read_obs(store):
    import anndata as ad
    import zarr
    return ad.io.read_elem(zarr.open_group(store, mode="r")["obs"])


def partial_labels(store, fraction, seed):
    """Keeps cell_type in a seeded uniform `fraction` of the cells; the rest are missing."""
    import anndata as ad
    import numpy as np
    import zarr
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    obs = ad.io.read_elem(group["obs"])
    keep = np.random.default_rng(int(seed)).random(len(obs)) < float(fraction)
    obs[PARTIAL] = obs["cell_type"].where(keep)
    ad.io.write_elem(group, "obs", obs)
    zarr.consolidate_metadata(store)


def label_accuracy(run, arm):
    """Accuracy of the arm's predictions on the cells whose label was hidden; None without them."""
    obs = read_obs(f"{run}/data.zarr")
    if PARTIAL not in obs or f"prediction_{arm}" not in obs:
        return None
    hidden = obs[PARTIAL].isna()
    truth = obs["cell_type"][hidden].astype(str)
    return float((obs[f"prediction_{arm}"][hidden].astype(str) == truth).mean())


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write_toml(tables, prefix=""):
    """Tables of scalars, lists and sub-tables (e.g. model.modalities.rna)."""
    out = []
    for name, table in tables.items():
        path = f"{prefix}{name}"
        out.append(f"[{path}]")
        out += [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        if subs:
            out.append(write_toml(subs, f"{path}."))
    return "\n".join(out)


def config(seed, layers, *extras):
    # Every epoch, as scvi-tools trains here (early_stopping=False).
    tables = {"train": {"seed": int(seed), "early_stopping_patience": 1_000_000},
              "model": {"n_layers": int(layers)}}
    for extra in filter(None, extras):
        with open(extra, "rb") as f:
            for name, table in tomllib.load(f).items():
                tables.setdefault(name, {}).update(table)
    print(write_toml(tables))


def tessera_run(run, arm):
    rows = list(csv.DictReader(open(f"{run}/{arm}/history.csv")))
    seconds = sum(float(r["seconds"]) for r in rows)
    cells = sum(float(r["cells_per_second"]) * float(r["seconds"]) for r in rows)
    curve = [float(r["validation_reconstruction"]) + float(r["validation_kl"]) for r in rows]
    train = [float(r["train_reconstruction"]) + float(r["train_kl"]) for r in rows]
    last = rows[-1]
    return {"cells_per_s": cells / seconds, "validation_elbo": curve[-1],
            "train_elbo_last10": statistics.fmean(train[-10:]),
            "validation_reconstruction": float(last["validation_reconstruction"]),
            "validation_kl": float(last["validation_kl"]), "curve": curve}


def scvi_run(run):
    out = last_json(f"{run}/scvi.json")
    rows = list(csv.DictReader(open(f"{run}/scvi_history.csv")))
    out["curve"] = [float(r["elbo_validation"]) for r in rows]
    # Older runs kept the validation terms only.
    train = [float(r["elbo_train"]) for r in rows if r.get("elbo_train")]
    out["train_elbo_last10"] = statistics.fmean(train[-10:]) if train else None
    return out


def jumpiness(curve, tail=20):
    """Mean absolute epoch-to-epoch change of the validation -ELBO over the last `tail` epochs."""
    c = curve[-tail - 1:]
    return statistics.fmean(abs(b - a) for a, b in zip(c, c[1:])) if len(c) > 1 else float("nan")


def arm_run(run, arm):
    out = scvi_run(run) if arm == "scvi" else tessera_run(run, arm)
    scores = json.load(open(f"{run}/{arm}/eval.json"))["scores"]
    out.update({k: scores.get(k) for k, _ in SCIB})
    out["label_accuracy"] = label_accuracy(run, arm)
    out.update(in_scvi(run, arm))
    curve = out.pop("curve")
    out["jumpiness"] = jumpiness(curve)
    out["validation_elbo_last10"] = statistics.fmean(curve[-10:])
    return out


def in_scvi(run, arm):
    """bench/scvi_weights.py's check of the arm's weights inside scvi-tools, where it ran: the
    largest latent difference and scvi-tools' -ELBO (mean of draws) minus tessera's."""
    path = f"{run}/{arm}/in_scvi.json"
    if not os.path.exists(path) or not open(path).read().strip():
        return {"in_scvi_latent_diff": None, "in_scvi_elbo_diff": None}
    check = last_json(path)
    return {"in_scvi_latent_diff": check["latent_max_abs_diff"],
            "in_scvi_elbo_diff": check["scvi_validation_elbo_of_tessera_weights"] - check["tessera_validation_elbo"]}


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(work, arms, seeds):
    results = {s: {a: arm_run(f"{work}/seed{s}", a) for a in arms} for s in seeds}
    fmt = lambda f, v: "n/a" if v is None else f.format(v)
    width = 12 * len(arms)
    label = " / ".join(arms)
    print(f"\n{'':26}" + "".join(f"{'seed ' + s:>{width}}" for s in seeds) + f"{'mean ± sd':>{width + 8 * len(arms)}}")
    print(f"{'':26}" + "".join(f"{label:>{width}}" for _ in seeds) + f"{label:>{width + 8 * len(arms)}}")
    summary = {}
    for key, name, f in ROWS:
        stats = {a: mean_sd([results[s][a][key] for s in seeds]) for a in arms}
        cells = [" / ".join(fmt(f, results[s][a][key]) for a in arms) for s in seeds]
        ms = lambda a: "n/a" if stats[a] is None else f"{f.format(stats[a][0])} ± {f.format(stats[a][1])}"
        print(f"{name:26}" + "".join(f"{c:>{width}}" for c in cells) + f"{' / '.join(ms(a) for a in arms):>{width + 8 * len(arms)}}")
        summary[key] = stats
    if "scvi" in arms:
        for a in arms:
            if a == "scvi":
                continue
            for key, what in (("validation_elbo", "last"), ("validation_elbo_last10", "last 10")):
                gaps = [100 * (results[s][a][key] / results[s]["scvi"][key] - 1) for s in seeds]
                print(f"{'Δ -ELBO % ' + a + ', ' + what:26.26}" + "".join(f"{g:>+{width - 1}.3f}%" for g in gaps)
                      + f"{statistics.fmean(gaps):>+{width + 8 * len(arms) - 1}.3f}%")
                summary[f"{key}_gap_percent_{a}"] = gaps
        paired([results[s] for s in seeds], [a for a in arms if a != "scvi"])
        tool = last_json(f"{work}/seed{seeds[0]}/scvi.json")
        tool = f"{tool['tool']}, {tool.get('model', 'SCVI')}"
    else:
        tool = "tessera only"
    json.dump({"arms": arms, "seeds": results, "mean_sd": summary, "anchor": tool},
              open(f"{work}/summary.json", "w"), indent=1)
    print(f"\n{tool}; results in {work}/ (summary.json)")


# Paired comparisons: (key, name, higher is better).
PAIRED = [("validation_elbo_last10", "-ELBO, mean of last 10", False), ("validation_elbo", "-ELBO, last epoch", False),
          ("train_elbo_last10", "training -ELBO, last 10", False),
          ("nmi", "NMI", True), ("ari", "ARI", True), ("silhouette_label", "cell-type ASW", True),
          ("ilisi", "iLISI", True), ("bio_conservation", "bio conservation", True),
          ("batch_correction", "batch correction", True), ("total", "scIB total", True)]


def paired(runs, arms):
    """Per tessera arm, the differences from scvi-tools run by run (same store, seed and
    validation cells): their mean with a 95% confidence interval, and how many favour tessera.
    An interval that holds 0 means the runs cannot tell the tools apart."""
    from scipy import stats
    for arm in arms:
        print(f"\npaired, {arm} - scvi over {len(runs)} runs{'':10}mean diff     95% interval   tessera better")
        for key, name, higher in PAIRED:
            diffs = [r[arm][key] - r["scvi"][key] for r in runs
                     if r[arm].get(key) is not None and r["scvi"].get(key) is not None]
            if len(diffs) < 2:
                continue
            mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
            half = stats.t.ppf(0.975, len(diffs) - 1) * sd / len(diffs) ** 0.5
            better = sum((d > 0) == higher for d in diffs if d != 0)
            print(f"  {name:40}{mean:>+10.4f}  [{mean - half:+.4f}, {mean + half:+.4f}]   {better} of {len(diffs)}")


def pooled(works):
    """`paired` over the runs of several side-by-side reports."""
    runs, arms = [], None
    for work in works:
        summary = json.load(open(f"{work}/summary.json"))
        arms = [a for a in summary["arms"] if a != "scvi"]
        runs += list(summary["seeds"].values())
    print(f"runs pooled from {', '.join(works)}")
    paired(runs, arms)


def last_json(path):
    """The last line of a tool's output as JSON (scvi-tools also logs to stdout)."""
    return json.loads(open(path).read().strip().splitlines()[-1])


def multimodal_run(run, arms):
    out = {}
    for arm in arms:
        anchor = arm in ("totalvi", "multivi")
        row = {"cells_per_s": last_json(f"{run}/{arm}.json")["cells_per_s"] if anchor
               else tessera_run(run, arm)["cells_per_s"]}
        scores = json.load(open(f"{run}/{arm}/eval.json"))["scores"]
        row.update({k: scores.get(k) for k, _ in SCIB})
        row.update({f"imputed_{k}": v for k, v in json.load(open(f"{run}/{arm}/impute.json")).items()})
        out[arm] = row
    return out


def multimodal(work, kinds, seeds):
    rows = [("cells_per_s", "training cells/s", "{:.0f}")] + [(k, n, "{:.4f}") for k, n in SCIB] + [
        ("imputed_pearson", "imputed: Pearson, log1p", "{:.4f}"), ("imputed_auroc", "imputed: AUROC", "{:.4f}")]
    summary = {}
    for kind, anchor, modality in (("cite", "totalvi", "prot"), ("multiome", "multivi", "atac")):
        if kind not in kinds.split(","):
            continue
        first = f"{work}/seed{seeds[0]}/{kind}"
        arms = ["tessera"] + (["recipe"] if os.path.exists(f"{first}/recipe/eval.json") else []) + [anchor]
        results = {s: multimodal_run(f"{work}/seed{s}/{kind}", arms) for s in seeds}
        label = " / ".join(arms)
        width = 12 * len(arms)
        print(f"\n{kind}: {label}, missing {modality} imputed on "
              f"{json.load(open(f'{first}/tessera/impute.json'))['cells']} cells")
        print(f"{'':26}" + "".join(f"{'seed ' + s:>{width}}" for s in seeds) + f"{'mean ± sd':>{width + 8 * len(arms)}}")
        for key, name, f in rows:
            values = {a: [results[s][a].get(key) for s in seeds] for a in arms}
            if all(v is None for a in arms for v in values[a]):
                continue
            fmt = lambda v: "n/a" if v is None else f.format(v)
            cells = [" / ".join(fmt(results[s][a].get(key)) for a in arms) for s in seeds]
            stats = {a: mean_sd(values[a]) for a in arms}
            ms = lambda a: "n/a" if stats[a] is None else f"{f.format(stats[a][0])} ± {f.format(stats[a][1])}"
            print(f"{name:26}" + "".join(f"{c:>{width}}" for c in cells)
                  + f"{' / '.join(ms(a) for a in arms):>{width + 8 * len(arms)}}")
            summary.setdefault(kind, {})[key] = stats
        summary.setdefault(kind, {})["seeds"] = results
        summary[kind]["anchor"] = last_json(f"{work}/seed{seeds[0]}/{kind}/{anchor}.json")["tool"]
    json.dump(summary, open(f"{work}/summary.json", "w"), indent=1)
    print(f"\nresults in {work}/ (summary.json)")


if __name__ == "__main__":
    if sys.argv[1] == "config":
        config(*sys.argv[2:])
    elif sys.argv[1] == "partial-labels":
        partial_labels(*sys.argv[2:])
    elif sys.argv[1] == "paired":
        pooled(sys.argv[2:])
    elif sys.argv[1] == "multimodal":
        multimodal(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        report(sys.argv[2], sys.argv[3].split(","), sys.argv[4:])
