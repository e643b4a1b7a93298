"""PNG plots of a bench run: per spec, latency against tokens and % of the floor against tokens."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._report import spec_groups

__all__ = ["plot_results"]


def _file_name(row: Mapping[str, Any]) -> str:
    style = "neox" if row["is_neox"] else "gptj"
    return (
        f"rope_q{row['num_heads']}_kv{row['num_kv_heads']}_d{row['head_size']}"
        f"_r{row['rotary_dim']}_{style}_{row['dtype']}.png"
    )


def plot_results(
    rows: Sequence[Mapping[str, Any]],
    save_dir: str | os.PathLike,
    *,
    copy_bandwidth: float,
    title: str = "",
) -> list[Path]:
    """One PNG per spec: median latency against tokens per provider (log-log, p20-p80 bars,
    the floor dashed), and % of the floor against tokens (log x).

    Args:
        rows: :func:`autotune.bench.run_bench` rows.
        save_dir: Directory for the PNG files (created).
        copy_bandwidth: Bytes/s defining the floor line.
        title: Prefix of each figure's title (e.g. the device name).

    Returns:
        The PNG paths, one per spec.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and none on a GPU server
    import matplotlib.pyplot as plt

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for group in spec_groups(rows):
        first = group[0]
        fig, (lat_ax, pct_ax) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
        providers = list(dict.fromkeys(r["provider"] for r in group))
        for name in providers:
            mine = [r for r in group if r["provider"] == name]
            tokens = [r["num_tokens"] for r in mine]
            p50 = [r["p50_us"] for r in mine]
            spread = [
                [r["p50_us"] - r["p20_us"] for r in mine],
                [r["p80_us"] - r["p50_us"] for r in mine],
            ]
            lat_ax.errorbar(tokens, p50, yerr=spread, marker="o", ms=3, capsize=2, label=name)
            pct_ax.plot(tokens, [r["pct_floor"] for r in mine], marker="o", ms=3, label=name)
        # The floor time: any row's median scaled by its fraction of the floor.
        by_tokens = {r["num_tokens"]: r for r in group}
        tokens = sorted(by_tokens)
        floor_us = [by_tokens[n]["p50_us"] * by_tokens[n]["pct_floor"] / 100 for n in tokens]
        lat_ax.plot(tokens, floor_us, "k--", marker="_", lw=1, label="floor")
        lat_ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="median latency (us)")
        lat_ax.set_title("latency (bars: p20-p80)")
        pct_ax.axhline(100, color="k", ls="--", lw=1)
        pct_ax.set(xscale="log", xlabel="tokens", ylabel="% of floor")
        pct_ax.set_title(f"% of floor ({copy_bandwidth / 1e12:.3g} TB/s copy)")
        for ax in (lat_ax, pct_ax):
            ax.grid(True, which="both", alpha=0.3)
        lat_ax.legend(fontsize="small")
        style = "NeoX" if first["is_neox"] else "GPT-J"
        fig.suptitle(
            f"{title + ': ' if title else ''}{first['num_heads']} q / {first['num_kv_heads']} kv "
            f"heads, head {first['head_size']}, rotary {first['rotary_dim']}, {style}, "
            f"{first['dtype']}"
        )
        path = save_dir / _file_name(first)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
