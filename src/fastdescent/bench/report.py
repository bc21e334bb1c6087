"""Derived figures and text tables of a bench run (live, or loaded from ``--json``)."""

from collections import defaultdict

from ..catalog import RULES


def _group(record):
    return (record["case"], record["rule"], record["dtype"], record["size"], record["tensors"],
            record.get("state_dtype"))


def _label(record):
    return record["method"] + (f"/{record['variant']}" if record["variant"] else "")


def derive(result):
    """Add to every timed record of ``result`` its rates and ratios:

    ``melem_per_s`` (median; ``melem_per_s_range`` from the slowest and fastest
    sample), ``gb_per_s`` (bytes read plus written), ``ceiling_fraction`` (of the
    ceiling at the same size, state dtype and thread count), ``vs_reference``,
    ``vs_torch_fused`` and ``vs_bnb_8bit`` (same thread count) and ``vs_1_thread``
    (same method at one thread): ratios of median times, above 1 when this record
    is faster.
    """
    timed = [r for r in result["records"] if "seconds" in r]
    index = {(_group(r), r["method"], r["variant"], r["threads"]): r for r in timed}

    def median(group, method, threads, variant=None):
        other = index.get((group, method, variant, threads))
        return None if other is None else other["seconds"]["median"]

    for r in timed:
        group, seconds = _group(r), r["seconds"]
        elements = r["size"] * r["tensors"]
        r["melem_per_s"] = elements / seconds["median"] / 1e6
        r["melem_per_s_range"] = [elements / seconds["max"] / 1e6, elements / seconds["min"] / 1e6]
        r["gb_per_s"] = elements * r["bytes_per_element"] / seconds["median"] / 1e9
        ceiling = median(group, "ceiling", r["threads"])
        r["ceiling_fraction"] = None if ceiling is None or r["method"] == "ceiling" else ceiling / seconds["median"]
        for key, method, threads in (("vs_reference", "reference", 1),
                                     ("vs_torch_fused", "torch-fused", r["threads"]),
                                     ("vs_bnb_8bit", "bnb-8bit", r["threads"])):
            other = median(group, method, threads)
            r[key] = None if other is None or r["method"] in ("ceiling", method) else other / seconds["median"]
        one = median(group, r["method"], 1, r["variant"])
        r["vs_1_thread"] = None if one is None or r["threads"] == 1 else one / seconds["median"]
    return result


def _num(x):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def _percent(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def _table(header, rows, align):
    """Fixed-width text table; ``align`` is a string of '<' / '>' per column."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [f"{str(cell):{a}{w}}" for cell, a, w in zip(row, align, widths)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _unavailable_note(records):
    reasons = sorted({f"{_label(r)}: {r['unavailable']}" for r in records if "unavailable" in r})
    return "".join(f"\n  not run: {reason}" for reason in reasons)


def _heading(result):
    c = result["config"]
    load = result.get("load_average")
    lines = [
        f"fastdescent {c['version']} bench, {result['started']}: kernels {c['variant']} "
        f"(built: {', '.join(c['variants_built'])}), up to {c['max_threads']} threads, serial below "
        f"{2 * c['min_elements_per_thread']:,} elements (parked workers woken when the measured wake-up pays, "
        f"always from {2 * c.get('min_elements_per_thread_cold', c['min_elements_per_thread']):,}); "
        f"torch {result['torch'] or 'not installed'}",
    ]
    idle = result["options"].get("idle")
    if idle:
        lines.append(f"each call timed alone after {idle * 1e3:g} ms of busy waiting (--idle)")
    if result.get("environment"):
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in result["environment"].items()))
    if load:
        lines.append(f"load average at start: {load[0]:.2f} (1 min) on {c['max_threads']} usable cores"
                     + ("  << the machine was busy: figures are noisy" if load[0] >= 0.5 else ""))
    return "\n".join(lines)


def _sizes_tables(records):
    by_table = defaultdict(list)
    for r in records:
        by_table[(r["rule"], r["dtype"], r.get("state_dtype"))].append(r)
    out = []
    for (name, dtype, state_dtype), rows in by_table.items():
        rule = RULES.get(name)
        first = rows[0]
        state = f", state {state_dtype}" if state_dtype else ""
        title = (f"{name}, {dtype}{state}: {rule.description if rule else ''}; "
                 f"{first['bytes_per_element']:g} bytes/element"
                 + (f" ({rule.reads} arrays read, {rule.writes} written)" if rule else ""))
        bnb = any(r.get("vs_bnb_8bit") for r in rows)
        body = [
            (f"{r['size']:,}", _label(r), r["threads"], _num(r["melem_per_s"]),
             f"({_num(r['melem_per_s_range'][0])}-{_num(r['melem_per_s_range'][1])})",
             _num(r["gb_per_s"]), _percent(r["ceiling_fraction"]), _ratio(r["vs_reference"]),
             _ratio(r["vs_torch_fused"]), *([_ratio(r.get("vs_bnb_8bit"))] if bnb else []), _ratio(r["vs_1_thread"]))
            for r in rows if "seconds" in r
        ]
        header = ("size", "method", "thr", "Melem/s", "(min-max)", "GB/s", "%ceil", "x ref", "x fused",
                  *(["x bnb8"] if bnb else []), "x 1thr")
        out.append(title + "\n" + _table(header, body, "<<" + ">" * (len(header) - 2)) + _unavailable_note(rows))
    return out


def _memory_table(records):
    body = [(r["rule"], r["dtype"], r["state_dtype"] or "native", f"{r['bytes_per_param']:.3f}") for r in records]
    return ("optimizer state memory: peak bytes per parameter element allocated by the first step of an "
            "optimizer on 2**20 elements (tracemalloc)\n"
            + _table(("rule", "params", "state", "bytes/param"), body, "<<<>"))


def _many_tables(records, many_shape):
    count, size = many_shape
    by_dtype = defaultdict(dict)
    for r in records:
        if "seconds" in r:
            by_dtype[r["dtype"]][(r["rule"], _label(r), r["threads"], r["tensors"])] = r
    out = []
    for dtype, found in by_dtype.items():
        body = []
        for (name, label, threads, tensors), r in found.items():
            if tensors != count:
                continue
            one = found.get((name, label, threads, 1))
            many_us = r["seconds"]["median"] * 1e6
            one_us = None if one is None else one["seconds"]["median"] * 1e6
            body.append((name, label, threads, _num(many_us),
                         f"({_num(r['seconds']['min'] * 1e6)}-{_num(r['seconds']['max'] * 1e6)})",
                         _num(one_us), "-" if one_us is None else f"{many_us / one_us:.2f}",
                         _ratio(r["vs_torch_fused"])))
        header = ("rule", "method", "thr", f"{count}x{size:,} us", "(min-max)", f"1x{count * size:,} us",
                  "many/one", "x fused")
        out.append(f"many small arrays, {dtype}: {count} arrays of {size:,} elements in one call "
                   f"vs one array of {count * size:,} (microseconds per step)\n"
                   + _table(header, body, "<<>>>>>>") + _unavailable_note(records))
    return out


def _overhead_tables(records):
    by_dtype = defaultdict(list)
    for r in records:
        by_dtype[r["dtype"]].append(r)
    out = []
    for dtype, rows in by_dtype.items():
        columns = list(dict.fromkeys(f"{_label(r)} {r['threads']}thr" for r in rows if "seconds" in r))
        cells = defaultdict(dict)
        for r in rows:
            if "seconds" in r:
                cells[r["rule"]][f"{_label(r)} {r['threads']}thr"] = _num(r["seconds"]["median"] * 1e6)
        body = [(name, *(found.get(c, "-") for c in columns)) for name, found in cells.items()]
        size = rows[0]["size"]
        out.append(f"per-call overhead, {dtype}: one array of {size:,} elements, microseconds per step "
                   "from Python (median)\n" + _table(("rule", *columns), body, "<" + ">" * len(columns)))
    return out


def render(result):
    """The tables of a bench run as text."""
    records = derive(result)["records"]
    parts = [_heading(result)]
    cases = defaultdict(list)
    for r in records:
        cases[r["case"]].append(r)
    parts += _sizes_tables(cases["sizes"])
    if cases["many"]:
        parts += _many_tables(cases["many"], tuple(result["options"]["many"]))
    if cases["overhead"]:
        parts += _overhead_tables(cases["overhead"])
    if cases["memory"]:
        parts.append(_memory_table(cases["memory"]))
    return "\n\n".join(parts) + "\n"
