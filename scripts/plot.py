#!/usr/bin/python3
"""Plots a guest reclaim run log as a PNG (run through scripts/plot).

Reads the QEMU serial output of a reclaim run: lines containing
`reclaim: sample key=value...` and `reclaim: result key=value...` (anything
before `reclaim:`, such as `[cpu0] vm0/vcpu0: guest: `, is ignored, and so
are all other lines). The hypervisor's console prints a guest line longer
than 200 bytes in pieces, each but the last ending in ` \\` and each with
the console's own `vmN/vcpuN: ` prefix; the pieces are joined first.

Draws one row per workload: frames held over time (one line per policy)
and, where a policy prints generations (mglru), its pages per generation
as a stacked area, oldest at the bottom. Each row's header names the
workload and gives each policy's refaults and saved % from its result line.

`--synthesize PATH` writes a synthetic log instead (a small simulation of
three policies on four workloads, in the console's format, split lines
included) and prints how many sample lines it wrote: for the self-test and
scripts/testdata.
"""

import argparse
import math
import os
import random
import re
import sys
from collections import OrderedDict, deque

PROG = "plot"

SAMPLE_FORMAT = (
    "reclaim: sample workload=<name> policy=<name> step=<n> resident=<n> "
    "held=<n> [gens=<n,n,...>]"
)
RESULT_FORMAT = (
    "reclaim: result workload=<name> policy=<name> accesses=<n> refaults=<n> "
    "refault_rate=<x> held_avg=<n> held_final=<n> saved_pct=<x> ..."
)

# The console's prefix on each piece of a guest line: `[cpuN] ` (the
# hypervisor's log prefix, absent in some captures) then `vmN/vcpuN: `.
CONSOLE_PREFIX = re.compile(r"^(?:\[cpu\d+\]\s+)?(vm\d+/vcpu\d+): ")
CONTINUED = " \\"
RECLAIM = re.compile(r"reclaim: (sample|result)(?=\s|$)")


class LogError(Exception):
    """A problem with the input that ends the run with a message."""


def warn(msg):
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- parsing


def joined_lines(lines):
    """Yields (line number, text) with console continuations joined.

    A piece ending in ` \\` continues on the next line with the same
    `vmN/vcpuN: ` prefix (lines in between from elsewhere, such as the
    hypervisor's own log, are passed through); that line's prefix is
    dropped and its text appended without a separator (the console splits
    at a byte count, in the middle of a word if need be). Lines without a
    console prefix continue on the next line without one.
    """
    pending = {}  # console key (or None) -> (first line number, text so far)
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        m = CONSOLE_PREFIX.match(line)
        key = m.group(1) if m else None
        if key in pending:
            start, text = pending.pop(key)
            text += line[m.end():] if m else line
        else:
            start, text = number, line
        if text.endswith(CONTINUED):
            pending[key] = (start, text[: -len(CONTINUED)])
        else:
            yield start, text
    for start, text in pending.values():  # a log cut off mid-line
        yield start, text


def key_values(text):
    out = {}
    for token in text.split():
        key, eq, value = token.partition("=")
        if eq and key:
            out[key] = value
    return out


def parse_int(fields, key):
    try:
        return int(fields[key])
    except (KeyError, ValueError):
        return None


def parse_float(fields, key):
    try:
        value = float(fields[key])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


class Series:
    """The samples of one (workload, policy) run."""

    def __init__(self):
        self.steps, self.held, self.resident, self.gens = [], [], [], []

    def add(self, step, held, resident, gens):
        self.steps.append(step)
        self.held.append(held)
        self.resident.append(resident)
        self.gens.append(gens)

    def has_gens(self):
        return any(g for g in self.gens)


class Run:
    """Everything read from a log, in order of first appearance."""

    def __init__(self):
        self.series = OrderedDict()  # (workload, policy) -> Series
        self.results = {}  # (workload, policy) -> dict of key -> str
        self.workloads = []
        self.policies = []
        self.samples = 0
        self.skipped = 0
        self.restarted = set()

    def note(self, workload, policy):
        if workload not in self.workloads:
            self.workloads.append(workload)
        if policy not in self.policies:
            self.policies.append(policy)


def parse_log(path):
    run = Run()
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in joined_lines(f):
            m = RECLAIM.search(text)
            if not m:
                continue
            kind = m.group(1)
            fields = key_values(text[m.end():])
            workload, policy = fields.get("workload"), fields.get("policy")
            if not workload or not policy:
                warn(f"{path}:{number}: `reclaim: {kind}` without workload= and policy=: skipped")
                run.skipped += 1
                continue
            key = (workload, policy)
            if kind == "result":
                run.note(workload, policy)
                run.results[key] = fields
                continue
            step = parse_int(fields, "step")
            held = parse_int(fields, "held")
            resident = parse_int(fields, "resident")
            if step is None or held is None or resident is None:
                warn(f"{path}:{number}: sample needs integer step=, resident= and held=: skipped")
                run.skipped += 1
                continue
            gens = None
            raw = fields.get("gens", "-")
            if raw not in ("", "-"):
                try:
                    gens = [int(g) for g in raw.split(",")]
                except ValueError:
                    warn(f"{path}:{number}: gens={raw} is not a list of integers: ignored")
            run.note(workload, policy)
            series = run.series.get(key)
            if series is None or (series.steps and step < series.steps[-1]):
                # The same workload and policy again (a second run in one
                # log): keep the latest.
                if series is not None:
                    run.restarted.add(key)
                series = run.series[key] = Series()
            series.add(step, held, resident, gens)
            run.samples += 1
    for workload, policy in sorted(run.restarted):
        warn(f"workload {workload} policy {policy} ran more than once: plotting the last run")
    return run


# --------------------------------------------------------------- plotting


def compact(value, _pos=None):
    """Tick label: 950, 4,000, 12.5k, 250k, 1.2M."""
    a = abs(value)
    if a >= 1e6:
        return f"{value / 1e6:.3g}M"
    if a >= 1e4:
        return f"{value / 1e3:.3g}k"
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:.3g}"


def result_note(fields):
    """`812 refaults, 41.2% saved` from a result line (what it has of it)."""
    if fields is None:
        return "no result line"
    parts = []
    refaults = parse_int(fields, "refaults")
    if refaults is not None:
        parts.append(f"{refaults:,} refault" + ("" if refaults == 1 else "s"))
    saved = parse_float(fields, "saved_pct")
    if saved is not None:
        parts.append(f"{saved:.1f}% saved")
    return ", ".join(parts) if parts else "result without refaults= or saved_pct="


def gen_layers(series):
    """(steps, layers oldest first, labels) for a stacked area.

    Generation lists are aligned at the youngest (the MGLRU window slides:
    aging adds a youngest generation, eviction empties the oldest), so a
    layer is a generation's rank from the youngest; a sample with fewer
    generations has nothing in the older ranks.
    """
    points = [(s, g) for s, g in zip(series.steps, series.gens) if g]
    steps = [s for s, _ in points]
    depth = max(len(g) for _, g in points)
    constant = all(len(g) == depth for _, g in points)
    layers, labels = [], []
    for rank in reversed(range(depth)):  # oldest rank first
        layers.append([g[-1 - rank] if rank < len(g) else 0 for _, g in points])
        if rank == 0:
            labels.append("youngest")
        elif rank == depth - 1:
            labels.append("oldest" if constant else f"youngest \u2212 {rank} (oldest)")
        else:
            labels.append(f"youngest \u2212 {rank}")
    return steps, layers, labels


def plot(run, out, metric, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.font_manager import FontProperties
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    from matplotlib.transforms import ScaledTranslation

    plt.rcParams.update({
        "font.size": 10,
        "axes.titlesize": 11,
        "axes.labelsize": 10,
        "legend.fontsize": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
    })
    palette = plt.get_cmap("tab10").colors
    # Known names get fixed colours, so plots of different logs compare.
    fixed = {"mglru": 0, "fifo": 1, "clock-perpage": 2, "clock": 2}
    colors, free = {}, [i for i in range(len(palette)) if i not in fixed.values()]
    for policy in run.policies:
        if policy in fixed:
            colors[policy] = palette[fixed[policy]]
        else:
            colors[policy] = palette[free.pop(0)] if free else None

    # Which policy's generations each workload shows.
    gens_of = {}
    for workload in run.workloads:
        with_gens = [p for p in run.policies
                     if (workload, p) in run.series and run.series[(workload, p)].has_gens()]
        if with_gens:
            gens_of[workload] = "mglru" if "mglru" in with_gens else with_gens[0]
    ncols = 2 if gens_of else 1
    width = 14.0 if ncols == 2 else 8.5

    fig = plt.figure(figsize=(width, 4), dpi=110, layout="constrained")
    fig.get_layout_engine().set(h_pad=0.06, w_pad=0.08, hspace=0.04, wspace=0.04)

    # Lay out each header (the workload's name, then one note per policy)
    # in lines that fit the width, measured with the figure's renderer.
    renderer = fig.canvas.get_renderer()
    name_font = FontProperties(size=13, weight="bold")
    note_font = FontProperties(size=10)

    def text_width_in(text, prop):
        w, _, _ = renderer.get_text_width_height_descent(text, prop, ismath=False)
        return w / fig.dpi

    gap = 0.35  # inches between pieces on a line
    usable = width - 1.4  # leave the y labels' margin and some slack
    line_h = 0.27
    headers = {}
    for workload in run.workloads:
        pieces = [(workload, name_font, "black")]
        for policy in run.policies:
            if (workload, policy) in run.series or (workload, policy) in run.results:
                note = f"{policy}: {result_note(run.results.get((workload, policy)))}"
                pieces.append((note, note_font, colors[policy] or "black"))
        lines, x = [[]], 0.0
        for text, prop, color in pieces:
            w = text_width_in(text, prop)
            if lines[-1] and x + gap + w > usable:
                lines.append([])
                x = 0.0
            if lines[-1]:
                x += gap
            lines[-1].append((x, text, prop, color))
            x += w
        headers[workload] = lines

    panel_h = 3.1
    ratios = []
    for workload in run.workloads:
        ratios += [0.08 + line_h * len(headers[workload]), panel_h]
    top = 0.5 if title else 0.1
    fig.set_size_inches(width, sum(ratios) + top + 0.15 * len(run.workloads))
    grid = fig.add_gridspec(2 * len(run.workloads), ncols, height_ratios=ratios)
    if title:
        fig.suptitle(title, fontsize=14, fontweight="bold")

    ylabel = {"held": "frames held", "resident": "pages resident", "both": "pages"}[metric]
    panel_title = {
        "held": "frames held over time",
        "resident": "pages resident over time",
        "both": "frames held (solid) and pages resident (dashed) over time",
    }[metric]

    def style(ax):
        ax.grid(True, color="0.9", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.xaxis.set_major_formatter(FuncFormatter(compact))
        ax.yaxis.set_major_formatter(FuncFormatter(compact))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=7, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.set_xlabel("step (access index)")

    for row, workload in enumerate(run.workloads):
        head = fig.add_subplot(grid[2 * row, :])
        head.axis("off")
        for i, line in enumerate(headers[workload]):
            y = -(i + 0.5) * line_h
            for x, text, prop, color in line:
                head.text(0, 1, text, fontproperties=prop, color=color, va="center", ha="left",
                          transform=head.transAxes + ScaledTranslation(x, y, fig.dpi_scale_trans))

        ax = fig.add_subplot(grid[2 * row + 1, 0])
        style(ax)
        xmin, xmax, top_y = None, None, 0
        for policy in run.policies:
            series = run.series.get((workload, policy))
            if series is None:
                continue
            color = colors[policy]
            marker = "o" if len(series.steps) < 3 else None  # else a lone point is invisible
            if metric in ("held", "both"):
                ax.plot(series.steps, series.held, color=color, linewidth=2, label=policy,
                        marker=marker, solid_capstyle="round")
                top_y = max(top_y, max(series.held))
            if metric in ("resident", "both"):
                ax.plot(series.steps, series.resident, color=color,
                        linewidth=1.4 if metric == "both" else 2,
                        linestyle="--" if metric == "both" else "-", marker=marker,
                        label=f"{policy} (resident)" if metric == "both" else policy)
                top_y = max(top_y, max(series.resident))
            lo, hi = min(series.steps), max(series.steps)
            xmin = lo if xmin is None else min(xmin, lo)
            xmax = hi if xmax is None else max(xmax, hi)
        ax.set_title(panel_title, loc="left")
        ax.set_ylabel(ylabel)
        if xmin is not None:
            ax.set_xlim(xmin, xmax) if xmax > xmin else ax.set_xlim(xmin - 1, xmin + 1)
        ax.set_ylim(0, max(top_y, 1) * 1.05)
        handles, names = ax.get_legend_handles_labels()
        if metric == "both":
            # One entry per policy, then what solid and dashed mean.
            from matplotlib.lines import Line2D

            keep = [i for i, name in enumerate(names) if not name.endswith(" (resident)")]
            handles = [handles[i] for i in keep] + [
                Line2D([], [], color="0.35", linewidth=2, label="frames held"),
                Line2D([], [], color="0.35", linewidth=1.4, linestyle="--", label="pages resident"),
            ]
            names = [names[i] for i in keep] + ["frames held", "pages resident"]
        if handles:
            ax.legend(handles, names, loc="center left", bbox_to_anchor=(1.01, 0.5),
                      frameon=False, title="policy", title_fontsize=9)

        if ncols == 2:
            gx = fig.add_subplot(grid[2 * row + 1, 1], sharex=ax)
            policy = gens_of.get(workload)
            if policy is None:
                gx.axis("off")
                gx.text(0.5, 0.5, "no generation samples for this workload", ha="center",
                        va="center", color="0.4", transform=gx.transAxes)
                continue
            style(gx)
            steps, layers, labels = gen_layers(run.series[(workload, policy)])
            cmap = plt.get_cmap("YlOrRd")
            n = len(layers)
            shades = [cmap(0.2 + 0.7 * i / max(n - 1, 1)) for i in range(n)]
            if len(steps) > 1:
                gx.stackplot(steps, layers, labels=labels, colors=shades,
                             edgecolor="white", linewidth=0.4)
            else:  # one sample: an area would be invisible, so a stacked bar
                bottom = 0
                for layer, label, shade in zip(layers, labels, shades):
                    gx.bar(steps, layer, bottom=bottom, width=0.5, color=shade, label=label,
                           edgecolor="white", linewidth=0.4)
                    bottom += layer[0]
            gx.set_title(f"pages per generation over time ({policy})", loc="left")
            gx.set_ylabel("pages")
            stack_top = max((sum(col) for col in zip(*layers)), default=0)
            gx.set_ylim(0, max(stack_top, 1) * 1.05)
            handles, names = gx.get_legend_handles_labels()
            gx.legend(handles[::-1], names[::-1], loc="center left", bbox_to_anchor=(1.01, 0.5),
                      frameon=False, title="generation", title_fontsize=9)

    directory = os.path.dirname(out)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)


# ------------------------------------------------------ synthetic log


def console_lines(text, cpu=0, vcpu=0, width=200):
    """The guest line `text` as the hypervisor's console prints it."""
    prefix = f"[cpu{cpu}] vm0/vcpu{vcpu}: "
    data = text.encode()
    pieces = [data[i:i + width] for i in range(0, len(data), width)] or [b""]
    return [prefix + p.decode() + (CONTINUED if i < len(pieces) - 1 else "")
            for i, p in enumerate(pieces)]


def access_stream(workload, rng, accesses):
    """Page numbers a workload touches, and how many pages it spans."""
    if workload == "idle":
        boot, hot = 2500, 150
        for i in range(accesses):
            if i < boot * 2:
                yield i // 2
            elif rng.random() < 0.97:
                yield rng.randrange(hot)
            else:
                yield rng.randrange(boot)
    elif workload == "hotcold":
        hot, cold = 600, 5000
        for _ in range(accesses):
            yield rng.randrange(hot) if rng.random() < 0.9 else hot + rng.randrange(cold)
    elif workload == "phase":
        hot, cold = 1000, 3000
        for i in range(accesses):
            base = 0 if i < accesses // 2 else hot
            yield base + rng.randrange(hot) if rng.random() < 0.9 else 2 * hot + rng.randrange(cold)
    elif workload == "scan":
        hot, span = 400, 10000
        position = 0
        for _ in range(accesses):
            if rng.random() < 0.3:
                yield rng.randrange(hot)
            else:
                yield hot + position
                position = (position + 1) % span
    else:
        raise ValueError(workload)


def simulate(workload, policy, rng, accesses=100_000, every=5_000, period=2_500):
    """A toy proactive reclaimer; yields sample dicts, then the result."""
    resident, referenced, gen, age, evicted_once = {}, set(), {}, {}, set()
    loaded = deque()  # fifo: (load time, page)
    max_seq, min_seq = 1, 0
    pending, passes = 0, 0  # frames freed by the guest, not yet taken back
    refaults = faults = evictions = 0
    held_sum = held_n = untouched_sum = 0
    touched = set()

    def held():
        return len(resident) + pending + len(touched) // 512 + 4

    def gens():
        counts = [0] * (max_seq - min_seq + 1)
        for g in gen.values():
            counts[g - min_seq] += 1
        return counts

    def sample(step):
        nonlocal held_sum, held_n, untouched_sum
        h = held()
        held_sum += h
        held_n += 1
        untouched_sum += len(touched) + len(touched) // 512 + 4
        s = {"step": step, "resident": len(resident), "held": h}
        if policy == "mglru":
            s["gens"] = ",".join(map(str, gens()))
        elif policy == "fifo":
            s["gens"] = "-"
        return s

    def evict(page):
        nonlocal evictions, pending
        del resident[page]
        referenced.discard(page)
        gen.pop(page, None)
        age.pop(page, None)
        evicted_once.add(page)
        evictions += 1
        pending += 1

    yield sample(0)
    for i, page in enumerate(access_stream(workload, rng, accesses), 1):
        touched.add(page)
        if page in resident:
            referenced.add(page)
        else:
            faults += 1
            refaults += page in evicted_once
            resident[page] = i
            loaded.append((i, page))
            if policy == "mglru":
                gen[page] = max_seq
            age[page] = 0
        if i % period == 0:
            passes += 1
            if policy == "mglru":
                max_seq += 1
                for p in referenced:
                    gen[p] = max_seq
                referenced.clear()
                if max_seq - min_seq > 3:
                    min_seq = max_seq - 3
                    for p in [p for p, g in gen.items() if g < min_seq]:
                        evict(p)
            elif policy == "fifo":  # the first-loaded sixth of what is resident
                quota = len(resident) // 6
                while quota > 0 and loaded:
                    t, p = loaded.popleft()
                    if resident.get(p) == t:  # not a stale entry of a reloaded page
                        evict(p)
                        quota -= 1
            else:  # clock, one referenced bit and an idle count per page
                for p in list(resident):
                    if p in referenced:
                        age[p] = 0
                    else:
                        age[p] += 1
                        if age[p] >= 2:
                            evict(p)
                referenced.clear()
            # The hypervisor takes freed frames back in batches of 64.
            pending %= 64
        if i % every == 0:
            yield sample(i)
    held_avg = held_sum // held_n
    result = {
        "accesses": accesses,
        "refaults": refaults,
        "refault_rate": f"{refaults / accesses:.4f}",
        "held_avg": held_avg,
        "held_final": held(),
        "saved_pct": f"{100 * (1 - held_sum / untouched_sum):.1f}",
        "faults": faults,
        "evictions": evictions,
        "passes": passes,
    }
    if policy == "mglru":
        result["max_seq"] = max_seq
        result["min_seq"] = min_seq
    yield result


def synthesize(path, seed=7):
    rng = random.Random(seed)
    out = [
        "[cpu0] INFO  EL2 MMU on, 16 MiB heap",
        "[cpu0] hyp: boot el=2 cpus=1 ram=0x40000000+0x40000000 uart=0x9000000 "
        "gic=0x8000000 hafdbs=0 pa_bits=44 ipa_bits=44 free_frames=257588",
        "[cpu0] INFO  vm0: 1 vCPUs, RAM 0x40000000+0x10000000, image 131072 bytes "
        "from 0x48000000, AF Software, IPA 44 bits",
        "[cpu0] INFO  vm0/vcpu0: starting at 0x40200000 (x0=0x40000000)",
    ]
    guest = lambda text: out.extend(console_lines("guest: " + text))  # noqa: E731
    guest("reclaim: 3 policies x 4 workloads, 100000 accesses each, sample every 5000")
    samples = 0
    for workload in ("idle", "hotcold", "phase", "scan"):
        for policy in ("mglru", "fifo", "clock-perpage"):
            guest(f"reclaim: start workload={workload} policy={policy}")
            for record in simulate(workload, policy, rng):
                if "step" in record:
                    fields = " ".join(f"{k}={v}" for k, v in record.items())
                    guest(f"reclaim: sample workload={workload} policy={policy} {fields}")
                    samples += 1
                else:
                    fields = " ".join(f"{k}={v}" for k, v in record.items())
                    lines = console_lines(f"guest: reclaim: result workload={workload} "
                                          f"policy={policy} {fields}")
                    if len(lines) > 1 and workload == "phase":
                        # The hypervisor's own log between two pieces.
                        lines.insert(1, "[cpu0] WARN  vm0/vcpu0: unknown hypercall "
                                        "0xc7001234: NOT_SUPPORTED")
                    out.extend(lines)
    guest("reclaim: done")
    out.append("[cpu0] INFO  vm0: powered off by vcpu0 (PSCI SYSTEM_OFF)")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    return samples


# ------------------------------------------------------------------ main


def main(argv):
    ap = argparse.ArgumentParser(prog=PROG, description="Plots a guest reclaim run log.")
    ap.add_argument("log", nargs="?")
    ap.add_argument("-o", "--output")
    ap.add_argument("--metric", choices=("held", "resident", "both"), default="held")
    ap.add_argument("--title")
    ap.add_argument("--synthesize", metavar="PATH")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)

    if args.synthesize:
        print(f"samples={synthesize(args.synthesize, args.seed)}")
        return 0
    if not args.log or not args.output:
        ap.error("a log and -o are required")
    if not os.path.isfile(args.log):
        raise LogError(f"log file not found: {args.log}")
    run = parse_log(args.log)
    if run.samples == 0:
        raise LogError(
            f"no `reclaim: sample` lines in {args.log}: expected lines like `{SAMPLE_FORMAT}` "
            f"(with any prefix, such as `guest: `)"
            + (f"; {run.skipped} malformed `reclaim:` line(s) skipped" if run.skipped else ""))
    missing = [f"{w}/{p}" for (w, p) in run.series if (w, p) not in run.results]
    if missing:
        warn(f"no `reclaim: result` line for {', '.join(missing)}")
    title = args.title
    if title is None:
        title = f"reclaim run: {os.path.basename(args.log)}"
    plot(run, args.output, args.metric, title)
    print(f"{PROG}: {run.samples} samples, {len(run.results)} results, "
          f"{len(run.workloads)} workloads x {len(run.policies)} policies -> {args.output}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except LogError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # reading the log or writing the PNG
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(1)
