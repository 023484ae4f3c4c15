"""Helpers of bench/side_by_side.sh.

  config SEED LAYERS [EXTRA.toml]   prints tessera's run configuration: the seed and the layers,
                                    with the settings of EXTRA (a recipe) merged over them
  report WORK SEED...               prints the per-seed results of both tools and their mean ± sd,
                                    and writes WORK/summary.json
"""

import csv
import json
import statistics
import sys
import tomllib

SCIB = [("silhouette_label", "cell-type ASW"), ("nmi", "NMI"), ("ari", "ARI"), ("clisi", "cLISI"),
        ("silhouette_batch", "batch ASW"), ("ilisi", "iLISI"), ("graph_connectivity", "graph connectivity"),
        ("bio_conservation", "bio conservation"), ("batch_correction", "batch correction"), ("total", "scIB total")]


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
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        out.append(f"[{path}]")
        out += [f"{k} = {toml_value(v)}" for k, v in scalars.items()]
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        if subs:
            out.append(write_toml(subs, f"{path}."))
    return "\n".join(out)


def config(seed, layers, extra=""):
    tables = {"train": {"seed": int(seed)}, "model": {"n_layers": int(layers)}}
    if extra:
        with open(extra, "rb") as f:
            for name, table in tomllib.load(f).items():
                tables.setdefault(name, {}).update(table)
    print(write_toml(tables))


def tessera_run(run):
    rows = list(csv.DictReader(open(f"{run}/tessera/history.csv")))
    seconds = sum(float(r["seconds"]) for r in rows)
    cells = sum(float(r["cells_per_second"]) * float(r["seconds"]) for r in rows)
    elbo = [float(r["validation_reconstruction"]) + float(r["validation_kl"]) for r in rows]
    last = rows[-1]
    return {"cells_per_s": cells / seconds, "validation_elbo": elbo[-1],
            "validation_reconstruction": float(last["validation_reconstruction"]),
            "validation_kl": float(last["validation_kl"]), "elbo_curve": elbo}


def scvi_run(run):
    out = json.load(open(f"{run}/scvi.json"))
    out["elbo_curve"] = [float(r["elbo_validation"]) for r in csv.DictReader(open(f"{run}/scvi_history.csv"))]
    return out


def jumpiness(curve, tail=20):
    """Mean absolute epoch-to-epoch change of the validation -ELBO over the last `tail` epochs."""
    c = curve[-tail - 1:]
    return statistics.fmean(abs(b - a) for a, b in zip(c, c[1:])) if len(c) > 1 else float("nan")


def report(work, seeds):
    results = {}
    for seed in seeds:
        run = f"{work}/seed{seed}"
        tools = {"tessera": tessera_run(run), "scvi": scvi_run(run)}
        for tool, key in (("tessera", "tessera"), ("scvi", "scvi")):
            scores = json.load(open(f"{run}/{key}/eval.json"))["scores"]
            tools[tool].update({k: scores.get(k) for k, _ in SCIB})
            tools[tool]["jumpiness"] = jumpiness(tools[tool].pop("elbo_curve"))
        results[seed] = tools
    rows = [("cells_per_s", "training cells/s", "{:.0f}"), ("validation_elbo", "validation -ELBO", "{:.2f}"),
            ("validation_reconstruction", "  reconstruction", "{:.2f}"), ("validation_kl", "  KL", "{:.2f}"),
            ("jumpiness", "  |Δ| per epoch, last 20", "{:.2f}")] + [(k, n, "{:.4f}") for k, n in SCIB]
    fmt = lambda f, v: "n/a" if v is None else f.format(v)
    print(f"\n{'':26}" + "".join(f"{'seed ' + s:>22}" for s in seeds) + f"{'mean ± sd':>36}")
    print(f"{'':26}" + "".join(f"{'tessera / scvi-tools':>22}" for _ in seeds) + f"{'tessera / scvi-tools':>36}")
    summary = {}
    for key, name, f in rows:
        cells, stats = [], {}
        for tool in ("tessera", "scvi"):
            values = [results[s][tool][key] for s in seeds]
            values = [v for v in values if v is not None]
            stats[tool] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
        for s in seeds:
            cells.append(f"{fmt(f, results[s]['tessera'][key])} / {fmt(f, results[s]['scvi'][key])}")
        ms = lambda t: "n/a" if stats[t] is None else f"{f.format(stats[t][0])} ± {f.format(stats[t][1])}"
        print(f"{name:26}" + "".join(f"{c:>22}" for c in cells) + f"{ms('tessera') + ' / ' + ms('scvi'):>36}")
        summary[key] = stats
    gaps = [100 * (results[s]["tessera"]["validation_elbo"] / results[s]["scvi"]["validation_elbo"] - 1) for s in seeds]
    print(f"{'-ELBO gap, tessera (%)':26}" + "".join(f"{g:>+22.3f}" for g in gaps) + f"{statistics.fmean(gaps):>+36.3f}")
    summary["validation_elbo_gap_percent"] = gaps
    tool = json.load(open(f"{work}/seed{seeds[0]}/scvi.json"))["tool"]
    json.dump({"seeds": results, "mean_sd": summary, "anchor": tool}, open(f"{work}/summary.json", "w"), indent=1)
    print(f"\n{tool}; results in {work}/ (summary.json)")


if __name__ == "__main__":
    if sys.argv[1] == "config":
        config(*sys.argv[2:])
    else:
        report(sys.argv[2], sys.argv[3:])
