"""The report as one self-contained HTML page: inline CSS, inline SVG figures, the data as an embedded JSON block.
Nothing is loaded from anywhere (no scripts, fonts, images or styles by URL), so the file works offline and can be
mailed or attached to an issue as it is."""

from __future__ import annotations

from html import escape

from loratools.visual import render
from loratools.visual.data import to_json

DATA_ID = "loratools-report-data"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d1d1f;
background:#f5f5f7}
main{max-width:1120px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:0 0 4px}h3{font-size:15px;margin:18px 0 6px}
section{background:#fff;border-radius:10px;padding:16px 20px;margin:16px 0;box-shadow:0 1px 3px rgba(0,0,0,.08)}
.path,.muted{color:#6e6e73;font-size:12px;word-break:break-all}
nav a{margin-right:14px}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{text-align:left;padding:3px 10px 3px 0;vertical-align:top;border-bottom:1px solid #eee}
th{font-weight:600;color:#424245}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.kv th{width:170px;font-weight:500;color:#6e6e73}
.figure svg{width:100%;height:auto;display:block}
.flags{border-radius:8px;padding:8px 12px;margin:8px 0}
.flags.bad{background:#fdecea;border:1px solid #f5c2bd}.flags.warn{background:#fff8e5;border:1px solid #f2dc9b}
.flags.ok{background:#eaf7ee;border:1px solid #bfe3c9}
.flags ul{margin:4px 0;padding-left:20px}
.chip{display:inline-block;background:#eef1f6;border-radius:10px;padding:1px 8px;margin:2px;font-size:12px}
details summary{cursor:pointer;color:#0066cc;font-size:13px}
code{font-size:12px}
"""


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _dist(d: dict) -> str:
    if not d or d.get("min") is None:
        return "none"
    values = d.get("values") or {}
    if len(values) == 1:
        return str(next(iter(values)))
    shown = ", ".join(f"{k}×{n}" for k, n in list(values.items())[:6]) + (" …" if len(values) > 6 else "")
    return f"{_num(d['min'])}–{_num(d['max'])} ({shown})"


def _kv(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _figure(svg: str) -> str:
    return f'<div class="figure">{svg}</div>'


def _family(info: dict) -> str:
    fam = info["family"]
    text = escape(fam.get("id", "unknown"))
    if fam.get("variant"):
        text += f" ({escape(fam['variant'])})"
    if fam.get("candidates"):
        text += f" — candidates {escape(', '.join(fam['candidates']))}"
    else:
        text += f" — confidence {fam.get('confidence', 0):.2f}"
    if fam.get("reason"):
        text += f" — {escape(fam['reason'])}"
    evidence = fam.get("evidence") or []
    more = [f"against: {m}" for m in fam.get("mismatches") or []]
    more += [f"runner-up {a.get('id')} {a.get('confidence', 0):.2f}: {a.get('why', '')}" for a in
             fam.get("alternatives") or []]
    if evidence or more:
        items = "".join(f"<li>{escape(e)}</li>" for e in evidence + more)
        text += f"<details><summary>evidence</summary><ul>{items}</ul></details>"
    return text


def _flags(data: dict) -> str:
    f = data["flags"]
    bad = []
    if f["nan_or_inf"]:
        bad.append(f"{len(f['nan_or_inf'])} modules hold NaN or Inf: " + ", ".join(f["nan_or_inf"][:8]))
    warn = []
    if f["all_zero"]:
        warn.append(f"{len(f['all_zero'])} modules are all zero (they do nothing): " + ", ".join(f["all_zero"][:8]))
    if f["needs_base"]:
        warn.append(f"{len(f['needs_base'])} modules depend on the base weights (not measured): "
                    + ", ".join(f["needs_base"][:8]))
    warn += [f"metadata contradicts the tensors: {c}" for c in f["contradictions"]]
    warn += list(f["warnings"])
    if not bad and not warn:
        return '<div class="flags ok">No problems found: every module is finite and non-zero, and the metadata ' \
               "agrees with the tensors.</div>"
    kind = "bad" if bad else "warn"
    items = "".join(f"<li>{escape(t)}</li>" for t in bad + warn)
    return f'<div class="flags {kind}"><strong>Flags</strong><ul>{items}</ul></div>'


def _summary(data: dict) -> str:
    info, stats = data["inspect"], data["stats"]
    rows = [
        ("format", escape(info["format"])),
        ("family", _family(info)),
        ("adapters", escape(", ".join(f"{k} ×{n}" for k, n in info["adapters"].items()))),
        ("modules", escape(f"{info['modules']} (" + ", ".join(f"{k} {n}" for k, n in info["components"].items())
                           + ")")),
        ("rank", escape(_dist(info["rank"]))),
        ("alpha", escape(_dist(info["alpha"]) + (f", missing on {info['alpha']['missing']}"
                                                  if info["alpha"].get("missing") else ""))),
        ("scale α/r", escape(_dist(info["scale"]))),
        ("strength", escape(_num(data["strength"]))),
        ("‖ΔW‖ total / max / mean", escape(" / ".join(_num(stats[k]) for k in ("total_norm", "max_norm",
                                                                               "mean_norm")))),
        ("size", escape(f"{_size(info['size_bytes'])}, {info['parameters']:,} parameters, "
                        + ", ".join(f"{k} ×{n}" for k, n in info["dtypes"].items()))),
    ]
    hashes = info.get("hashes") or {}
    if hashes:
        shown = [f"{k} <code>{escape(str(hashes[k]))}</code>" for k in ("autov2", "autov3", "sha256", "legacy")
                 if hashes.get(k)]
        if "embedded_matches" in hashes:
            shown.append("embedded sshs_model_hash " + ("matches" if hashes["embedded_matches"] else "is stale"))
        rows.append(("hashes", "<br>".join(shown)))
    return _kv(rows)


def _training(info: dict) -> str:
    training = info.get("training") or {}
    parts = []
    if training.get("summary"):
        parts.append(_kv([(k, escape(str(v))) for k, v in training["summary"].items()]))
    if training.get("tags"):
        chips = "".join(f'<span class="chip">{escape(str(t))} {n}</span>' for t, n in training["tags"])
        parts.append(f"<p>Caption tags: {chips}</p>")
    if training.get("keys"):
        rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v)[:400])}</td></tr>"
                       for k, v in training["keys"].items())
        parts.append(f'<details><summary>all training metadata ({len(training["keys"])} entries)</summary>'
                     f'<table class="kv">{rows}</table></details>')
    return "".join(parts) or '<p class="muted">No training metadata in the file.</p>'


def _resize_table(data: dict) -> str:
    preds = data["resize"]["predictions"]
    head = ("<tr><th>resize with</th><th class=num>truncated / copied</th><th class=num>new ranks</th>"
            "<th class=num>retained mean</th><th class=num>retained min</th><th class=num>energy kept</th>"
            "<th class=num>size after</th></tr>")
    rows = []
    for p in preds:
        a = p["actions"]
        ranks = "–" if p["rank_min"] is None else (
            f"{p['rank_min']}" if p["rank_min"] == p["rank_max"] else
            f"{p['rank_min']}–{p['rank_max']} (mean {p['rank_mean']:.1f})")
        share = f" ({p['bytes_after'] / p['bytes_before']:.0%})" if p["bytes_before"] else ""
        rows.append(f"<tr><td><code>{escape(p['label'])}</code></td><td class=num>{a['truncated']} / {a['copied']}"
                    f"</td><td class=num>{ranks}</td><td class=num>{_pct(p['retained_mean'])}</td>"
                    f"<td class=num>{_pct(p['retained_min'])}</td><td class=num>{_pct(p['energy_retained'])}</td>"
                    f"<td class=num>{_size(p['bytes_after'])}{share}</td></tr>")
    refused = data["resize"]["refused"]
    note = ""
    if refused:
        items = "".join(f"<li>{escape(r)}</li>" for r in refused[:10])
        note = f'<p class="muted">resize would refuse this file as it is:</p><ul class="muted">{items}</ul>'
    return f"<table>{head}{''.join(rows)}</table>{note}"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _top_modules(data: dict, n: int = 12) -> str:
    rows = sorted((r for r in data["modules"] if r["norm"] is not None), key=lambda r: -r["norm"])[:n]
    head = ("<tr><th>module</th><th>block</th><th>type</th><th class=num>rank</th><th class=num>alpha</th>"
            "<th class=num>‖s·ΔW‖</th><th class=num>eff. rank</th></tr>")
    body = "".join(
        f"<tr><td><code>{escape(r['component'])}:{escape(r['name'])}</code></td><td>{escape(r['block'])}</td>"
        f"<td>{escape(r['type'])}</td><td class=num>{_num(r['rank'])}</td><td class=num>{_num(r['alpha'])}</td>"
        f"<td class=num>{_num(r['norm'])}</td><td class=num>{_num(r['effective_rank'])}</td></tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def lora_section(data: dict, axis: list[dict], key: str) -> str:
    """One LoRA: flags, summary, strength map, spectra, resize table, strongest modules, training metadata."""
    own = {c["component"] for c in data["blocks"]}
    axis = [c for c in axis if c["component"] in own] or axis  # the shared cells of the components it has
    block_map = render.svg(render.block_map([data], axis), f"{key}-map")
    spectra = render.svg(render.spectra(data), f"{key}-spectra")
    return (f'<section id="{key}"><h2>{escape(data["label"])}</h2><div class="path">{escape(data["path"])}</div>'
            f"{_flags(data)}{_summary(data)}"
            "<h3>Where it acts: ‖ΔW‖ per block</h3>"
            '<p class="muted">Frobenius norm of the scaled update (strength × α/r × up·down, computed from the '
            "factors) of all modules in each block, in the base model's order; × marks NaN/Inf, ○ all-zero.</p>"
            f"{_figure(block_map)}"
            "<h3>Rank: spectra, effective rank, what resize keeps</h3>"
            f"{_figure(spectra)}{_resize_table(data)}"
            f"<h3>Strongest modules</h3>{_top_modules(data)}"
            f"<h3>Training metadata</h3>{_training(data['inspect'])}</section>")


def comparison_section(loras: list[dict], axis: list[dict]) -> str:
    """Several LoRAs on the same axes: a side-by-side summary, the strength maps overlaid, the energy curves."""
    cols = "".join(f"<th>{escape(d['label'])}</th>" for d in loras)
    facts = [
        ("format", lambda d: escape(d["inspect"]["format"])),
        ("family", lambda d: escape(d["inspect"]["family"].get("id", "unknown"))),
        ("modules", lambda d: str(d["inspect"]["modules"])),
        ("rank", lambda d: escape(_dist(d["inspect"]["rank"]))),
        ("alpha", lambda d: escape(_dist(d["inspect"]["alpha"]))),
        ("strength", lambda d: escape(_num(d["strength"]))),
        ("size", lambda d: _size(d["inspect"]["size_bytes"])),
        ("‖ΔW‖ total", lambda d: _num(d["stats"]["total_norm"])),
        ("flags", lambda d: str(sum(len(v) for v in d["flags"].values()))),
    ]
    rows = "".join(f"<tr><th>{escape(name)}</th>" + "".join(f"<td>{get(d)}</td>" for d in loras) + "</tr>"
                   for name, get in facts)
    overlay = render.svg(render.block_map(loras, axis), "compare-map")
    energy = render.svg(render.energy_overlay(loras), "compare-energy")
    return (f'<section id="comparison"><h2>Comparison</h2><table><tr><th></th>{cols}</tr>{rows}</table>'
            "<h3>‖ΔW‖ per block, same axes</h3>"
            f'<p class="muted">Bottom row: each block\'s norm divided by the first file\'s.</p>{_figure(overlay)}'
            f"<h3>Energy kept at each rank</h3>{_figure(energy)}</section>")


def page(report: dict, title: str | None = None) -> str:
    """The whole page for the report's data (``data.report_data``)."""
    loras, axis = report["loras"], report["axis"]
    title = title or ("LoRA report: " + ", ".join(d["label"] for d in loras))
    links = "".join(f'<a href="#lora-{k}">{escape(d["label"])}</a>' for k, d in enumerate(loras, 1))
    parts = [f"<header><h1>{escape(title)}</h1><p class=muted>{escape(report['generator'])} · "
             f"{len(loras)} file{'s' if len(loras) != 1 else ''}</p><nav>{links}</nav></header>"]
    if len(loras) > 1:
        parts.append(comparison_section(loras, axis))
    parts += [lora_section(d, axis, f"lora-{k}") for k, d in enumerate(loras, 1)]
    data = to_json(report, separators=(",", ":")).replace("</", "<\\/")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>{''.join(parts)}</main>"
            f'<script type="application/json" id="{DATA_ID}">{data}</script></body></html>\n')
