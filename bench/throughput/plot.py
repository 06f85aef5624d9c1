"""The figure (``bench/results/throughput.png``): throughput of every loop and of the
bridge end to end on each broker, poll lateness, memory, CPU by process, publish latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.throughput.measurement import e2e, schedule
from bench.throughput.report import broker_short, sustained_runs


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 9.5))
    s = results["settings"]
    cons: list[dict[str, Any]] = results.get("concurrent", [])
    ncon = results.get("naive_concurrent")
    sus = sustained_runs(results)
    several = len({r.get("broker") for r in sus}) > 1

    def sus_label(r: dict[str, Any]) -> str:
        where = f"\n{broker_short(results, r.get('broker'))}" if several else ""
        return f"{r['transport']}{where}"

    ax = axes[0][0]
    labels: list[str] = []
    rates: list[float] = []
    colors: list[str] = []
    for client, r in results.get("ceilings", {}).items():
        labels.append("bare\n" + client.replace("proto-", "proto\n"))
        rates.append(r["rps"])
        colors.append("#9aa5b1")
    for r in sus:
        labels.append(f"bridge e2e\n{sus_label(r)}")
        rates.append(e2e(r))
        colors.append("#2b6cb0" if "Kafka" not in sus_label(r) else "#2c7a7b")
    if "naive_sustained" in results:
        labels.append("naive e2e")
        rates.append(e2e(results["naive_sustained"]))
        colors.append("#c05621")
    ax.bar(labels, rates, color=colors)
    for i, v in enumerate(rates):
        ax.annotate(f"{v:,.0f}", (i, v), ha="center", va="bottom", fontsize=7)
    ax.axhline(1000, color="red", linestyle="--", linewidth=1, label="target 1,000 polls/s")
    ax.set_ylabel("per second on one core: requests (bare), acknowledged polls (e2e)")
    ax.set_title("Throughput: bare HTTP loops vs end to end")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)

    ax = axes[0][1]
    runs = [(f"bridge, {schedule(c)}", c) for c in cons]
    if ncon:
        runs.append((f"naive, every {ncon['interval_s']:g} s", ncon))
    for label, c in runs:
        late = c.get("lateness")
        if not late or not late["sample"]:
            continue
        xs = sorted(max(1e-3, v) for v in late["sample"])
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    ax.axvline(0.25, color="red", linestyle="--", linewidth=1, label="p99 target 250 ms")
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("poll lateness, s (log; < 1 ms shown at 1 ms)")
    ax.set_ylabel("fraction of polls")
    ax.set_title(f"Poll lateness CDF, {s['concurrent']:,} in flight")
    ax.legend(fontsize=8)

    ax = axes[0][2]
    for label, c in runs:
        late = c.get("lateness")
        if not late or not late["series"]:
            continue
        ax.plot([r[0] for r in late["series"]], [r[3] for r in late["series"]], label=label)
    ax.axhline(0.25, color="red", linestyle="--", linewidth=1, label="250 ms")
    ax.set_yscale("log")
    ax.set_xlabel("second of the measurement window (by scheduled time)")
    ax.set_ylabel("p99 lateness of polls due that second, s")
    ax.set_title("Lateness over time")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    mem = results.get("memory", [])
    if mem:
        xs2 = [p["in_flight"] for p in mem]
        ax.plot(xs2, [p["rss"] / 2**20 for p in mem], marker="o", label="bridge RSS")
        base = mem[0]["rss"] / 2**20
        ax.plot(xs2, [base + 2048 * x / 2**20 for x in xs2], "r--", label="budget: 2 KB/task")
        for p in mem[1:]:
            ax.annotate(
                f"{p['per_task']:,.0f} B/task",
                (p["in_flight"], p["rss"] / 2**20),
                textcoords="offset points",
                xytext=(8, -14),
                fontsize=8,
            )
        ax.set_xlabel("tasks in flight")
        ax.set_ylabel("RSS, MiB")
        ax.set_title("Memory")
        ax.legend(fontsize=8)

    ax = axes[1][1]
    bars: list[tuple[str, dict[str, float]]] = []
    for client, r in results.get("ceilings", {}).items():
        bars.append((client.replace("proto-", "p-"), {"poller": r["cpu_share"], **r["core1"]}))
    for r in sus:
        bars.append((f"e2e\n{sus_label(r)}", {"poller": r["cpu"].get("bridge", 0), **r["cpu"]}))
    if "naive_sustained" in results:
        nv = results["naive_sustained"]["cpu"]
        bars.append(("e2e\nnaive", {"poller": nv.get("naive", 0), **nv}))
    for c in cons:
        bars.append((f"10k\n{schedule(c)[6:]}", {"poller": c["cpu"].get("bridge", 0), **c["cpu"]}))
    if ncon:
        bars.append(("10k\nnaive", {"poller": ncon["cpu"].get("naive", 0), **ncon["cpu"]}))
    procs = ("poller", "simulator", "broker", "bench")
    width = 0.2
    for j, proc in enumerate(procs):
        vals = [100 * cpu.get(proc, 0.0) for _, cpu in bars]
        ax.bar([i + j * width for i in range(len(bars))], vals, width, label=proc)
    ax.set_xticks([i + 1.5 * width for i in range(len(bars))], [b[0] for b in bars], fontsize=6)
    ax.axhline(100, color="grey", linestyle=":", linewidth=1)
    ax.set_ylabel("% of one core")
    ax.set_title("CPU by process (poller: core 0; the rest share core 1)")
    ax.legend(fontsize=8)

    ax = axes[1][2]
    pubs = [(label, c["publish_latency"]) for label, c in runs if "publish_latency" in c]
    pubs += [
        (f"sustained\n{sus_label(r)}", r["publish_latency"])
        for r in sus
        if r["transport"] == s["transport"]
    ]
    for j, q in enumerate(("p50", "p99")):
        vals = [1000 * min(10.0, pub[q] or 0.0) for _, pub in pubs]
        ax.bar([i + j * 0.35 for i in range(len(pubs))], vals, 0.35, label=q)
    ax.set_xticks([i + 0.175 for i in range(len(pubs))], [label for label, _ in pubs])
    ax.axhline(50, color="red", linestyle="--", linewidth=1, label="p99 target 50 ms")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylabel("ms (poll response → broker ack)")
    ax.set_title(f"Publish latency: {s['concurrent']:,} in flight; sustained end to end")
    ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("wavespeed-bridge on one core")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
