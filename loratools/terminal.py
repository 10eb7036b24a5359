"""Rendering API results for people (rich). `--json` output is the same dicts, printed as JSON."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

_console = Console(highlight=False)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _dist(d: dict, missing: int = 0) -> str:
    if d["min"] is None:
        return "none" + (f" (missing on {missing})" if missing else "")
    values = d["values"]
    if len(values) == 1:
        text = next(iter(values))
    else:
        shown = ", ".join(f"{k}×{n}" for k, n in list(values.items())[:6]) + (" …" if len(values) > 6 else "")
        text = f"{_fmt(d['min'])}–{_fmt(d['max'])} (most common {_fmt(d['common'])}; {shown})"
    if missing:
        text += f", missing on {missing}"
    return str(text)


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _family_line(fam: dict) -> Text:
    t = Text()
    fid = fam.get("id", "unknown")
    t.append(fid, style="bold red" if fid == "unknown" else "bold green")
    if fam.get("variant"):
        t.append(f" ({fam['variant']})")
    if fam.get("candidates"):  # undecided: the families it may be, for --family
        t.append(f"  candidates {', '.join(fam['candidates'])}", style="yellow")
        return t
    t.append(f"  confidence {fam.get('confidence', 0):.2f}")
    alts = fam.get("alternatives") or []
    if alts:
        a = alts[0]
        t.append(f"  runner-up {a.get('id')} {a.get('confidence', 0):.2f}", style="dim")
    return t


def print_inspect(info: dict, top: int = 20, console: Console | None = None) -> None:
    c = console or _console
    c.rule(Text(info["path"], style="bold"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="cyan", no_wrap=True)
    grid.add_column()
    fam = info["family"]
    grid.add_row("format", info["format"])
    grid.add_row("family", _family_line(fam))
    for line in fam.get("evidence", [])[:6]:
        grid.add_row("", Text(f"✓ {line}", style="dim"))
    for line in fam.get("mismatches", [])[:4]:
        grid.add_row("", Text(f"✗ {line}", style="yellow"))
    if fam.get("reason"):
        grid.add_row("", Text(fam["reason"], style="yellow"))
    for claim in fam.get("metadata_claims", []):
        if claim.get("agrees") is True:
            continue  # already among the evidence
        verdict = {True: "agrees", False: "DISAGREES", None: "unchecked"}[claim.get("agrees")]
        grid.add_row("", Text(f"metadata {claim['key']}={claim['value']!r} {verdict}",
                              style="red" if claim.get("agrees") is False else "dim"))
    grid.add_row("adapters", ", ".join(f"{k} ×{n}" for k, n in info["adapters"].items()))
    if info.get("dora_axis"):
        grid.add_row("DoRA axis", ", ".join(f"{k} ×{n}" for k, n in info["dora_axis"].items()))
    grid.add_row("modules", f"{info['modules']}  (" + ", ".join(f"{k} {n}" for k, n in info["components"].items()) + ")")
    grid.add_row("rank", _dist(info["rank"]))
    grid.add_row("alpha", _dist(info["alpha"], info["alpha"]["missing"]))
    grid.add_row("scale α/r", _dist(info["scale"]) + ("  (rsLoRA α/√r)" if info.get("rslora") else ""))
    grid.add_row("dtypes", ", ".join(f"{k} ×{n}" for k, n in info["dtypes"].items()))
    grid.add_row("size", f"{_size(info['size_bytes'])}, {info['tensors']} tensors, {info['parameters']:,} parameters")
    for k, n in info.get("extras", {}).items():
        grid.add_row(k, str(n))
    if "hashes" in info:
        h = info["hashes"]
        for rel, fh in h.get("files", {}).items():  # a folder of adapters: one line per weights file
            grid.add_row("sha256", f"{fh['sha256']}  {rel}")
        if "sha256" in h:
            grid.add_row("sha256", h["sha256"])
            grid.add_row("AutoV2", h["autov2"])
        if "autov3" in h:
            grid.add_row("AutoV3", h["autov3"] + ("" if h.get("embedded_matches", True) else
                                                     "  (embedded sshs_model_hash is stale)"))
    for w in info["warnings"]:
        grid.add_row(Text("warning", style="yellow"), w)
    c.print(grid)
    if "training" in info:
        _print_training(info["training"], top, c)
    if "layers" in info:
        _print_layers(info["layers"], info.get("stats"), c)
    elif "stats" in info:
        _print_stats(info["stats"], c)


def _print_training(tr: dict, top: int, c: Console) -> None:
    t = Table(title="training", show_header=False, title_justify="left")
    t.add_column(style="cyan")
    t.add_column(overflow="fold")
    for k, v in tr["summary"].items():
        t.add_row(k, v)
    c.print(t)
    if tr["tags"]:
        tags = Table(title=f"top {min(top, len(tr['tags']))} tags", title_justify="left")
        tags.add_column("tag")
        tags.add_column("count", justify="right")
        for tag, n in tr["tags"][:top]:
            tags.add_row(tag, str(n))
        c.print(tags)
    keys = Table(title="ss_* / modelspec.* metadata", title_justify="left")
    keys.add_column("key", style="cyan")
    keys.add_column("value", overflow="fold")
    for k, v in tr["keys"].items():
        keys.add_row(k, v if len(v) <= 300 else v[:300] + " …")
    c.print(keys)


def _print_layers(rows: list[dict], stats: dict | None, c: Console) -> None:
    by_name = {r["name"]: r for r in stats["modules"]} if stats else {}
    t = Table(title="modules", title_justify="left")
    for col in ("module", "comp", "type", "rank", "alpha", "scale", "in", "out", "dtype"):
        t.add_column(col, justify="right" if col in ("rank", "alpha", "scale", "in", "out") else "left")
    if stats:
        t.add_column("‖ΔW‖", justify="right")
        t.add_column("eff. rank", justify="right")
    for r in rows:
        cells = [r["name"], r["component"], r["type"] + (f"+dora({r['dora']})" if r["dora"] else ""),
                 _fmt(r["rank"]) if r["rank"] is not None else "-", _fmt(r["alpha"]) if r["alpha"] is not None else "-",
                 f"{r['scale']:g}", _fmt(r["in"]) if r["in"] else "-", _fmt(r["out"]) if r["out"] else "-", r["dtype"]]
        if stats:
            s = by_name.get(r["name"], {})
            cells += [f"{s['norm']:.4g}" if s.get("norm") is not None else ",".join(s.get("flags", [])) or "-",
                      f"{s['effective_rank']:.2f}" if s.get("effective_rank") is not None else "-"]
        t.add_row(*cells)
    c.print(t)
    if stats:
        _print_stats_summary(stats, c)


def _print_stats(stats: dict, c: Console) -> None:
    rows = sorted((r for r in stats["modules"] if r["norm"] is not None), key=lambda r: -r["norm"])
    t = Table(title="largest ‖ΔW‖ (scale included)", title_justify="left")
    t.add_column("module")
    t.add_column("‖ΔW‖_F", justify="right")
    t.add_column("eff. rank", justify="right")
    for r in rows[:10]:
        t.add_row(r["name"], f"{r['norm']:.4g}", f"{r['effective_rank']:.2f}")
    c.print(t)
    _print_stats_summary(stats, c)


def _print_stats_summary(stats: dict, c: Console) -> None:
    s = stats["summary"]
    total = f"{s['total_norm']:.4g}" if s["total_norm"] is not None else "-"
    c.print(f"total ‖ΔW‖_F {total}; NaN/Inf modules {s['nan_or_inf']}, all-zero {s['all_zero']}, "
            f"needing base weights {s['needs_base']}")
    for r in stats["modules"]:
        if "nan_or_inf" in r["flags"] or "all_zero" in r["flags"]:
            c.print(Text(f"  {r['name']}: {', '.join(r['flags'])}", style="yellow"))


def print_convert(results: list[dict], console: Console | None = None) -> None:
    c = console or _console
    t = Table(title="convert", title_justify="left")
    for col in ("input", "family", "from", "to", "modules", "output", "s"):
        t.add_column(col, justify="right" if col in ("modules", "s") else "left", overflow="fold")
    for r in results:
        if r["ok"]:
            t.add_row(r["path"], r["family"], r["source_format"], r["target"],
                      f"{r['modules_in']} -> {r['modules_out']}", r["output"], f"{r['seconds']:.2f}")
        else:
            t.add_row(r["path"], "", "", "", "", Text(f"failed: {r['error']}", style="red"), "")
    c.print(t)
    failed = sum(1 for r in results if not r["ok"])
    c.print(f"{len(results) - failed} converted, {failed} failed")


def print_verify(r: dict, console: Console | None = None) -> None:
    c = console or _console
    worst = sorted(r["modules"], key=lambda m: -m["rel_error"])[:10]
    t = Table(title=f"verify ({r['family']}): {r['compared']} modules compared", title_justify="left")
    t.add_column("module")
    t.add_column("relative error", justify="right")
    for m in worst:
        t.add_row(m["target"], f"{m['rel_error']:.3g}")
    c.print(t)
    for side, key in (("A", "only_in_a"), ("B", "only_in_b")):
        if r[key]:
            c.print(Text(f"{len(r[key])} modules only in {side}: " + ", ".join(r[key][:10]), style="yellow"))
    verdict = "EQUAL" if r["equal"] else "DIFFERENT"
    c.print(Text(f"{verdict}: max relative error {r['max_rel_error']:.3g} (rtol {r['rtol']:g})",
                 style="bold green" if r["equal"] else "bold red"))


def print_lowrank(report: dict, operation: str, console: Console | None = None) -> None:
    """The resize/merge report: the modules that lost the most, then the summary."""
    c = console or _console
    rows = [m for m in report["modules"] if m.get("retained") is not None]
    rows.sort(key=lambda m: m["retained"])
    t = Table(title=f"{operation}: lowest retained energy", title_justify="left")
    for col in ("module", "rank", "retained", "rel. error"):
        t.add_column(col, justify="left" if col == "module" else "right")
    for m in rows[:10]:
        old = m.get("old_rank", m.get("ranks"))
        new = m.get("new_rank", m.get("rank"))
        t.add_row(m["name"], f"{old} -> {new}", f"{m['retained']:.6f}", f"{m.get('error') or 0:.3g}")
    c.print(t)
    s = report["summary"]
    c.print(f"{s.get('modules')} modules; retained energy mean {s.get('retained_mean')}, min {s.get('retained_min')}; "
            f"{s.get('bytes_before')} -> {s.get('bytes_after')} bytes; written {report['output']} ({report['format']})")
    for w in report.get("warnings", []):
        c.print(Text(f"warning: {w}", style="yellow"))
