"""Tables, paired statistics and charts of the EMA/SAM ablation (``benchmarks/ablation.py``).

:func:`write_report` turns the result records of finished runs into ``ablation.csv`` (one row per run
and target), ``ablation.md`` (mean +/- std per cell; the paired difference of every variant against
``plain`` over the same seeds with a two-sided 95 % Student t interval; a difference whose interval
contains zero is reported as "within noise") and one PNG per data set and target (validation MAE per
variant with every seed, and validation loss of the EMA weights next to the raw weights per epoch).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from matsciml.common.atomic import atomic_path, atomic_write_text

__all__ = ["paired_interval", "write_report", "CSV_COLUMNS"]

CSV_COLUMNS = (
    "dataset",
    "target",
    "unit",
    "variant",
    "group",
    "lr_policy",
    "epochs",
    "ema_decay",
    "sam_rho",
    "seed",
    "best_epoch",
    "val_mae_best",
    "val_mae_final",
    "test_mae",
    "mean_predictor_test_mae",
    "train_wall_s",
    "train_cpu_s",
    "steps",
    "n_train",
    "n_val",
    "n_test",
    "run_id",
)
VARIANT_ORDER = ("plain", "ema", "sam", "ema+sam")
LABELS = {"plain": "plain", "ema": "EMA", "sam": "SAM", "ema+sam": "EMA+SAM"}


def paired_interval(differences: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided Student t interval ``(mean, low, high)``.

    With fewer than two differences the interval is ``(nan, nan)``.
    """
    n = len(differences)
    mean = statistics.fmean(differences) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    half = t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half, mean + half


def _rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        run = record["run"]
        for target, values in record["targets"].items():
            rows.append(
                {
                    "dataset": run["dataset"],
                    "target": target,
                    "unit": values["unit"],
                    "variant": run["variant"],
                    "group": run["group"],
                    "lr_policy": run["lr_policy"],
                    "epochs": run["epochs"],
                    "ema_decay": run["decay"] if "ema" in run["variant"] else "",
                    "sam_rho": run["rho"] if "sam" in run["variant"] else "",
                    "seed": run["seed"],
                    "best_epoch": values["best_epoch"],
                    "val_mae_best": values["val_mae_best"],
                    "val_mae_final": values["val_mae_final"],
                    "test_mae": values["test_mae"],
                    "mean_predictor_test_mae": values["mean_predictor_test_mae"],
                    "train_wall_s": round(record["train_wall_s"], 2),
                    "train_cpu_s": round(record["train_cpu_s"], 2),
                    "steps": record["steps"],
                    "n_train": record["n_train"],
                    "n_val": record["n_val"],
                    "n_test": record["n_test"],
                    "run_id": record["run_id"],
                    "_curves": values,
                }
            )
    return rows


def _write_text(path: Path, text: str) -> Path:
    return atomic_write_text(path, text)


def _save_figure(fig: Any, path: Path) -> None:
    """Save ``fig`` as ``path`` atomically (a PNG; the temporary name keeps the suffix) and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.fmean(values):.3g} ± {statistics.stdev(values):.2g}"


def _verdict(mean: float, low: float, high: float) -> str:
    if math.isnan(low):
        return "one seed: no interval"
    if low <= 0 <= high:
        return "within noise"
    return "lower (better)" if mean < 0 else "higher (worse)"


def _diff_cell(diffs: list[float]) -> tuple[str, str]:
    mean, low, high = paired_interval(diffs)
    if math.isnan(low):
        return f"{mean:+.3g}", _verdict(mean, low, high)
    return f"{mean:+.3g} [{low:+.3g}, {high:+.3g}]", _verdict(mean, low, high)


def _key(row: dict[str, Any]) -> tuple:
    return (row["lr_policy"], row["epochs"], str(row["ema_decay"]), str(row["sam_rho"]))


def _paired(rows: list[dict[str, Any]], reference: list[dict[str, Any]], column: str) -> list[float]:
    by_seed = {r["seed"]: r[column] for r in reference}
    return [r[column] - by_seed[r["seed"]] for r in rows if r["seed"] in by_seed]


class Doc:
    """Headings, paragraphs and tables, rendered as Markdown (``ablation.md``) or reStructuredText (``.inc``)."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", header, rows))

    def markdown(self) -> str:
        out = []
        for block in self.blocks:
            if block[0] == "heading":
                out.append("#" * block[1] + " " + block[2])
            elif block[0] == "para":
                out.append(block[1])
            else:
                lines = ["| " + " | ".join(block[1]) + " |", "|" + "---|" * len(block[1])]
                lines += ["| " + " | ".join(row) + " |" for row in block[2]]
                out.append("\n".join(lines))
        return "\n\n".join(out) + "\n"

    def rst(self, top: int = 2) -> str:
        """reStructuredText; heading level ``top`` and below use ``-``, ``~``, ``^`` underlines."""
        marks = {top: "-", top + 1: "~", top + 2: "^"}
        out = []
        for block in self.blocks:
            if block[0] == "heading":
                if block[1] >= top:
                    out.append(block[2] + "\n" + marks.get(block[1], "^") * len(block[2]))
            elif block[0] == "para":
                out.append(block[1].replace("`", "``").replace("````", "``"))
            else:
                lines = [".. list-table::", "   :header-rows: 1", ""]
                for row in [block[1], *block[2]]:
                    lines.append("   * - " + row[0])
                    lines += [f"     - {cell}" for cell in row[1:]]
                out.append("\n".join(lines))
        return "\n\n".join(out) + "\n"


def _main_section(rows: list[dict[str, Any]], doc: Doc) -> None:
    main = [r for r in rows if r["group"] == "main"]
    cells: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in main:
        cells[(r["dataset"], r["target"])][r["variant"]].append(r)
    for (dataset, target), variants in sorted(cells.items()):
        plain = variants.get("plain", [])
        unit = (plain or next(iter(variants.values())))[0]["unit"]
        seeds = sorted({r["seed"] for v in variants.values() for r in v})
        any_row = next(iter(variants.values()))[0]
        doc.heading(3, f"{dataset}: {target} ({unit})")
        doc.para(
            f"{any_row['n_train']} train / {any_row['n_val']} validation / {any_row['n_test']} test structures; "
            f"{any_row['epochs']} epochs, {any_row['lr_policy']} learning rate; seeds {seeds}. "
            "MAE of the checkpoint with the lowest validation loss (for EMA runs: the EMA weights); "
            "mean ± std over seeds."
        )
        table = []
        for variant in VARIANT_ORDER:
            group = variants.get(variant)
            if group:
                table.append(
                    [
                        LABELS[variant],
                        str(len(group)),
                        _mean_std([r["val_mae_best"] for r in group]),
                        _mean_std([r["val_mae_final"] for r in group]),
                        _mean_std([r["test_mae"] for r in group]),
                        _mean_std([r["mean_predictor_test_mae"] for r in group]),
                        f"{statistics.fmean(r['train_cpu_s'] for r in group):.0f}",
                    ]
                )
        header = ["variant", "seeds", "val MAE (best epoch)", "val MAE (last epoch)", "test MAE"]
        doc.table(header + ["mean predictor (test)", "CPU s/run"], table)
        if not plain:
            continue
        doc.para(
            "Paired difference against plain (same seeds; negative = lower error than plain), mean [95 % t interval]:"
        )
        table = []
        for variant in VARIANT_ORDER[1:]:
            group = variants.get(variant)
            if group:
                val, val_verdict = _diff_cell(_paired(group, plain, "val_mae_best"))
                test, test_verdict = _diff_cell(_paired(group, plain, "test_mae"))
                table.append([LABELS[variant], val, val_verdict, test, test_verdict])
        doc.table(["variant", "Δ val MAE (best epoch)", "verdict", "Δ test MAE", "verdict"], table)


def _sweep_section(rows: list[dict[str, Any]], doc: Doc) -> None:
    sweep = [r for r in rows if r["group"] == "sweep"]
    if not sweep:
        return
    main = [r for r in rows if r["group"] == "main" and r["dataset"] == sweep[0]["dataset"]]
    plain = [r for r in main if r["variant"] == "plain"]
    doc.heading(2, f"Sweep of EMA decay and SAM rho ({sweep[0]['dataset']}, {sweep[0]['target']}, {sweep[0]['unit']})")
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in sweep + [r for r in main if r["variant"] in ("ema", "sam")]:
        name = f"EMA decay {r['ema_decay']:g}" if r["variant"] == "ema" else f"SAM rho {r['sam_rho']:g}"
        groups[name].append(r)
    table = []
    for name in sorted(groups):
        group = groups[name]
        diff, verdict = _diff_cell(_paired(group, plain, "test_mae")) if plain else ("n/a", "n/a")
        val, test = _mean_std([r["val_mae_best"] for r in group]), _mean_std([r["test_mae"] for r in group])
        table.append([name, str(len(group)), val, test, diff, verdict])
    doc.table(
        ["setting", "seeds", "val MAE (best epoch)", "test MAE", "Δ test MAE vs plain [95 % t]", "verdict"], table
    )


def _final_gain(row: dict[str, Any]) -> float:
    """Raw minus EMA validation loss at the last epoch (positive: EMA better)."""
    raw, ema = row["_curves"]["curve_val_raw_loss"], row["_curves"]["curve_val_loss"]
    return raw[-1] - ema[-1] if raw and ema else math.nan


def _regime_section(rows: list[dict[str, Any]], doc: Doc) -> None:
    regime = [r for r in rows if r["group"] == "regime"]
    if not regime:
        return
    dataset = regime[0]["dataset"]
    candidates = [r for r in rows if r["dataset"] == dataset and r["group"] in ("main", "regime")]
    candidates = [r for r in candidates if r["variant"] in ("plain", "ema")]
    cells: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in candidates:
        cells[(r["lr_policy"], r["epochs"])][r["variant"]].append(r)
    doc.heading(2, f"Learning-rate policy x run length ({dataset}, {regime[0]['target']}, {regime[0]['unit']})")
    doc.para(
        "`cosine`: annealed to zero over the run; `constant`: no scheduler. EMA gain = validation loss of the raw "
        "weights minus that of the EMA weights at the last epoch (normalised units; > 0: EMA better)."
    )
    table = []
    for (policy, epochs), variants in sorted(cells.items()):
        plain, ema = variants.get("plain", []), variants.get("ema", [])
        diff, verdict = _diff_cell(_paired(ema, plain, "test_mae")) if plain and ema else ("n/a", "n/a")
        gains = [g for g in (_final_gain(r) for r in ema) if math.isfinite(g)]
        seeds = f"{len(plain)}/{len(ema)}"
        plain_mae, ema_mae = _mean_std([r["test_mae"] for r in plain]), _mean_std([r["test_mae"] for r in ema])
        table.append([policy, str(epochs), seeds, plain_mae, ema_mae, diff, verdict, _mean_std(gains)])
    header = ["lr policy", "epochs", "seeds (plain/EMA)", "plain test MAE", "EMA test MAE", "Δ test MAE [95 % t]"]
    doc.table(header + ["verdict", "EMA gain, last epoch"], table)


def _chart(rows: list[dict[str, Any]], dataset: str, target: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r["group"] == "main" and r["dataset"] == dataset and r["target"] == target]
    unit = main[0]["unit"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    variants = [v for v in VARIANT_ORDER if any(r["variant"] == v for r in main)]
    for i, variant in enumerate(variants):
        for column, offset, marker in (("val_mae_best", -0.12, "o"), ("test_mae", 0.12, "s")):
            values = [r[column] for r in main if r["variant"] == variant]
            left.scatter([i + offset] * len(values), values, s=14, marker=marker, color=f"C{i}", alpha=0.6)
            if len(values) > 1:
                left.errorbar(
                    i + offset, statistics.fmean(values), yerr=statistics.stdev(values), color="k", capsize=4, fmt="_"
                )
    left.set_xticks(range(len(variants)), [LABELS[v] for v in variants])
    left.set_ylabel(f"MAE ({unit})")
    left.set_title(f"{dataset}: {target}\n(circles: validation, squares: test; bars: mean ± std)", fontsize=9)
    ema_rows = [r for r in main if r["variant"] == "ema"]
    for k, r in enumerate(ema_rows):
        curves = r["_curves"]
        epochs = range(1, len(curves["curve_val_loss"]) + 1)
        right.plot(epochs, curves["curve_val_raw_loss"], color="C3", lw=1, label="raw weights" if k == 0 else None)
        right.plot(epochs, curves["curve_val_loss"], color="C0", lw=1, label="EMA weights" if k == 0 else None)
    if ema_rows:
        right.set_yscale("log")
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no EMA runs", ha="center", transform=right.transAxes)
    right.set_xlabel("epoch")
    right.set_ylabel("validation loss (normalised)")
    right.set_title("EMA (decay 0.99) vs raw weights, one line per seed", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def _regime_chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regime = [r for r in rows if r["group"] == "regime"]
    if not regime:
        return None
    dataset = regime[0]["dataset"]
    ema = [r for r in rows if r["dataset"] == dataset and r["variant"] == "ema" and r["group"] in ("main", "regime")]
    cells = sorted({(r["lr_policy"], r["epochs"]) for r in ema})
    fig, axes = plt.subplots(1, len(cells), figsize=(3.2 * len(cells), 3.2), sharey=True, squeeze=False)
    for ax, (policy, epochs) in zip(axes[0], cells):
        for k, r in enumerate(x for x in ema if (x["lr_policy"], x["epochs"]) == (policy, epochs)):
            gain = [a - b for a, b in zip(r["_curves"]["curve_val_raw_loss"], r["_curves"]["curve_val_loss"])]
            ax.plot(range(1, len(gain) + 1), gain, color=f"C{k}", lw=1)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(f"{policy}, {epochs} epochs", fontsize=9)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("val loss(raw) - val loss(EMA)\n(> 0: EMA better)")
    fig.suptitle(f"{dataset}: EMA gain per epoch, one line per seed", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def write_report(
    records: list[dict[str, Any]],
    out: Path,
    charts: Path,
    command: str,
    skipped: dict[str, str] | None = None,
    datasets: dict[str, Any] | None = None,
) -> list[Path]:
    """Write ``ablation.csv``, ``ablation.md`` and the charts; return their paths."""
    rows = _rows(records)
    rows.sort(key=lambda r: (r["group"] != "main", r["dataset"], r["target"], _key(r), r["variant"], r["seed"]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    written = [_write_text(out / "ablation.csv", buffer.getvalue())]

    doc = Doc()
    cpu = sum(r["train_cpu_s"] for r in records)
    doc.heading(1, "EMA / SAM ablation")
    doc.para(f"Command: `{command}`")
    doc.para(f"{len(records)} runs, {cpu / 60:.1f} CPU minutes of training in all.")
    for name, reason in (skipped or {}).items():
        doc.para(f"Left out: `{name}`: {reason}")
    doc.heading(2, "Variants against plain")
    _main_section(rows, doc)
    _sweep_section(rows, doc)
    _regime_section(rows, doc)
    written.append(_write_text(out / "ablation.md", doc.markdown()))
    charts.mkdir(parents=True, exist_ok=True)
    written.append(_write_text(charts / "ablation_tables.inc", doc.rst(top=2)))
    for dataset, target in sorted({(r["dataset"], r["target"]) for r in rows if r["group"] == "main"}):
        written.append(_chart(rows, dataset, target, charts / f"ablation_{dataset}_{target}.png"))
    regime = _regime_chart(rows, charts / "ablation_regimes.png")
    if regime is not None:
        written.append(regime)
    return written
