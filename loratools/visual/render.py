"""The report's figures, drawn by matplotlib from the report's data: the per-block strength map, spectra and
retained energy per module group, and the comparison overlays. SVG text for the page, PNG for `inspect --plot`.

Figures are built on ``matplotlib.figure.Figure`` (Agg canvas), never through pyplot, so nothing global changes and
no display is needed. Sizes are fixed (``WIDTH`` inches, constrained layout), so a figure's SVG is always
``WIDTH * 72`` points wide.
"""

from __future__ import annotations

import io
import math

WIDTH = 11.0  # inches: 792 pt in the SVG, ~1056 px on screen
MAP_HEIGHT = 3.2  # per row of the block map
SPECTRA_HEIGHT = 3.4
OVERLAY_HEIGHT = 3.0
FONT = 8
_FLAG_MARKS = {"nan_or_inf": ("x", "#d62728", "NaN/Inf"), "all_zero": ("o", "#7f7f7f", "all zero")}


def _figure(height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(WIDTH, height), layout="constrained")


def _short(block: str) -> str:
    """An 'other' module's label: its last two path segments."""
    return ".".join(block.split(".")[-2:])


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(k % 10) for k in range(n)]


def _cell_positions(component: dict) -> tuple[list[int], dict[str, int], list[tuple[str, int, int]]]:
    """x of each cell (a gap of one between stacks), the x of each block, and each stack's (name, first x, last x)."""
    xs, where, spans = [], {}, []
    x, last = 0, object()
    for cell in component["cells"]:
        stack = cell["stack"] if cell["stack"] is not None else None
        if stack != last and xs:
            x += 1
        if stack != last:
            spans.append([stack or "other", x, x])
            last = stack
        xs.append(x)
        where[cell["block"]] = x
        spans[-1][2] = x
        x += 1
    return xs, where, [tuple(s) for s in spans]


def _ticks(ax, component: dict, xs: list[int], spans) -> None:
    from matplotlib.transforms import blended_transform_factory

    labels = []
    for cell in component["cells"]:
        labels.append(str(cell["index"]) if cell["stack"] is not None else _short(cell["block"]))
    step = 1 if len(xs) <= 40 else 2
    keep = [k for k, cell in enumerate(component["cells"]) if cell["stack"] is None or cell["index"] % step == 0]
    ax.set_xticks([xs[k] for k in keep], [labels[k] for k in keep], fontsize=FONT - 2.5)
    for label, cell in zip(ax.get_xticklabels(), [component["cells"][k] for k in keep]):
        if cell["stack"] is None:
            label.set_rotation(60)
            label.set_horizontalalignment("right")
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for name, lo, hi in spans:
        if name != "other":
            ax.annotate(name, xy=((lo + hi) / 2, 1.0), xycoords=trans, xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=FONT - 1.5, color="#444")
    ax.set_xlim(-0.8, (xs[-1] if xs else 0) + 0.8)
    ax.tick_params(axis="x", length=2, pad=1)


def _width_ratios(axis: list[dict]) -> list[float]:
    """Panel widths: the denoiser's by its cells; text encoders' at half a cell each (they are narrower models and
    the denoiser is what a map is read for)."""
    return [(1 if k == 0 else 0.5) * max(len(c["cells"]), 6) + 2 for k, c in enumerate(axis)]


def block_map(loras: list[dict], axis: list[dict], title: str | None = None):
    """Bars of ‖ΔW‖_F per block (the square root of the sum of its modules' ‖s·ΔW‖²), one panel per component,
    blocks in model order. Several LoRAs share the axes: bars side by side, and a second row with each LoRA's
    norm relative to the first one's."""
    compare = len(loras) > 1
    fig = _figure(MAP_HEIGHT * (1.5 if compare else 1))
    grid = fig.add_gridspec(2 if compare else 1, len(axis), width_ratios=_width_ratios(axis),
                            height_ratios=[2, 1] if compare else None)
    colors = _palette(max(len(loras), 10))
    top = max((c["norm"] for d in loras for c in d["blocks"] if math.isfinite(c["norm"])), default=0.0)
    first_ax = None
    for col, component in enumerate(axis):
        xs, where, spans = _cell_positions(component)
        ax = fig.add_subplot(grid[0, col], sharey=first_ax)
        first_ax = first_ax or ax
        width = 0.8 / len(loras)
        for k, data in enumerate(loras):
            cells = {c["block"]: c for c in data["blocks"] if c["component"] == component["component"]}
            shift = (k - (len(loras) - 1) / 2) * width
            heights = [cells[c["block"]]["norm"] if c["block"] in cells else 0.0 for c in component["cells"]]
            if compare:
                ax.bar([x + shift for x in xs], heights, width=width, color=colors[k], label=data["label"])
            else:
                stack_color = {name: _palette(10)[j % 10] for j, (name, _, _) in enumerate(spans)}
                stack_color["other"] = "#8c8c8c"
                bar_colors = [stack_color[c["stack"] or "other"] for c in component["cells"]]
                ax.bar(xs, heights, width=0.8, color=bar_colors)
            for flag, (marker, color, _) in _FLAG_MARKS.items():
                hit = [where[b] + shift for b, c in cells.items() if flag in c["flags"] and b in where]
                if hit:
                    ax.plot(hit, [0] * len(hit), marker, color=color, markersize=6, clip_on=False, zorder=5)
        ax.set_title(component["component"], fontsize=FONT + 1, loc="left", pad=12)
        _ticks(ax, component, xs, spans)
        ax.tick_params(axis="y", labelsize=FONT - 1)
        ax.grid(axis="y", alpha=0.3)
        if col == 0:
            ax.set_ylabel("‖ΔW‖_F per block", fontsize=FONT)
        else:
            ax.tick_params(axis="y", labelleft=False)
        if compare:
            _ratio_panel(fig.add_subplot(grid[1, col], sharex=ax), loras, component, xs, colors, col == 0)
    if first_ax is not None and top > 0:
        first_ax.set_ylim(0, top * 1.08)
    if compare:
        handles, labels = first_ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside upper right", fontsize=FONT, ncols=min(len(loras), 4))
    if title:
        fig.suptitle(title, fontsize=FONT + 2, x=0.01, ha="left")
    return fig


def _ratio_panel(ax, loras, component, xs, colors, first_col: bool) -> None:
    """Each LoRA's block norm divided by the first LoRA's (1 = the same strength there)."""
    base = {c["block"]: c["norm"] for c in loras[0]["blocks"] if c["component"] == component["component"]}
    for k, data in enumerate(loras[1:], start=1):
        cells = {c["block"]: c["norm"] for c in data["blocks"] if c["component"] == component["component"]}
        pts = [(x, cells[c["block"]] / base[c["block"]]) for x, c in zip(xs, component["cells"])
               if base.get(c["block"]) and c["block"] in cells and math.isfinite(cells[c["block"]])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[k], markersize=3, linewidth=0.8)
    ax.axhline(1.0, color="#444", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="y", labelsize=FONT - 1)
    ax.tick_params(axis="x", labelsize=FONT - 2.5)
    if first_col:
        ax.set_ylabel(f"÷ {loras[0]['label'][:24]}", fontsize=FONT)


def spectra(data: dict):
    """Three panels for one LoRA's module groups: normalised singular values σᵢ/σ₁ (median, 10–90% band),
    retained energy against the rank kept (with the resize rules marked), and effective ranks."""
    fig = _figure(SPECTRA_HEIGHT)
    ax_s, ax_e, ax_r = fig.subplots(1, 3, width_ratios=[1, 1, 0.9])
    groups = [g for g in data["groups"] if g["with_spectrum"]]
    colors = _palette(len(groups))
    for g, color in zip(groups, colors):
        q = g["spectrum_quantiles"]
        ks = list(range(1, len(q["q50"]) + 1))
        ax_s.plot(ks, q["q50"], color=color, linewidth=1.2, label=g["group"])
        ax_s.fill_between(ks, q["q10"], q["q90"], color=color, alpha=0.15, linewidth=0)
        curve = g["retained_energy"]
        ax_e.plot(range(1, len(curve) + 1), curve, color=color, linewidth=1, label=g["group"])
    whole = data["retained_energy"]
    if whole:
        ax_e.plot(range(1, len(whole) + 1), whole, color="black", linewidth=1.6, label="whole LoRA")
    dynamic_marks = iter("Dv^<>ph*")
    for p in data["resize"]["predictions"]:
        if p["energy_retained"] is None:
            continue
        if p["rule"]["dynamic"] is None:  # a fixed rank: a square at k, labelled there
            x = p["rule"]["rank"]
            ax_e.plot([x], [p["energy_retained"]], "s", color="black", markersize=4, zorder=5)
            ax_e.annotate(f"rank {x}", (x, p["energy_retained"]), xytext=(4, -9), textcoords="offset points",
                          fontsize=FONT - 2.5)
        else:  # a dynamic rule: its mean rank, named in the legend (several often land on one spot)
            ax_e.plot([p["rank_mean"]], [p["energy_retained"]], next(dynamic_marks, "o"), color="black",
                      markersize=4, zorder=5, linestyle="none", label=p["label"].removeprefix("--dynamic "))
    lowest = min((v for g in groups for v in g["spectrum_quantiles"]["q10"]), default=1.0)
    if lowest < 0.1:
        ax_s.set_yscale("log")
    if groups:
        ax_r.boxplot([g["effective_ranks"] for g in groups], orientation="horizontal", widths=0.6,
                     tick_labels=[g["group"] for g in groups], flierprops={"markersize": 2})
        ax_r.invert_yaxis()
    ax_s.set_title("singular values σᵢ/σ₁ (median, 10–90%)", fontsize=FONT, loc="left")
    ax_e.set_title("energy kept at rank k (resize rules marked)", fontsize=FONT, loc="left")
    ax_r.set_title("effective rank per module", fontsize=FONT, loc="left")
    ax_s.set_xlabel("i", fontsize=FONT)
    ax_e.set_xlabel("rank k", fontsize=FONT)
    ax_e.set_ylim(0, 1.02)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_s, ax_e):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_r.xaxis.set_major_locator(MaxNLocator(nbins=5))
    for ax in (ax_s, ax_e, ax_r):
        ax.tick_params(labelsize=FONT - 1)
        ax.grid(alpha=0.3)
    if groups:
        ax_e.legend(fontsize=FONT - 2.5, loc="lower right")
    return fig


def energy_overlay(loras: list[dict]):
    """The whole-LoRA retained-energy curves of several LoRAs on one axis."""
    fig = _figure(OVERLAY_HEIGHT)
    ax = fig.subplots()
    for data, color in zip(loras, _palette(max(len(loras), 10))):
        curve = data["retained_energy"]
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, color=color, linewidth=1.4, label=data["label"])
    ax.set_xlabel("rank k kept per module", fontsize=FONT)
    ax.set_ylabel("fraction of Σ‖s·ΔW‖² kept", fontsize=FONT)
    ax.set_ylim(0, 1.02)
    longest = max((len(d["retained_energy"]) for d in loras), default=1)
    if longest > 16:
        from matplotlib.ticker import FixedLocator, ScalarFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator([2 ** k for k in range(longest.bit_length())]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=FONT - 1)
    ax.legend(fontsize=FONT - 1, loc="lower right")
    return fig


def svg(fig, salt: str) -> str:
    """The figure as an ``<svg>`` element to inline in a page (text as text, no XML prologue). ``salt`` keeps
    the ids of different figures on one page apart, and the output the same from run to run."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def png(fig, dpi: int = 150) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()
