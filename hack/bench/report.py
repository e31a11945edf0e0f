#!/usr/bin/env python3
"""Summary of a benchmark-suite run (hack/bench/suite.sh).

Usage: report.py RESULTS_DIR [--docs DOCS_DIR] [--benchplot BIN]

Reads RESULTS_DIR/env.json and RESULTS_DIR/runs/*.json (one per migration),
writes RESULTS_DIR/summary.json (medians, min, max per figure), the chart
list RESULTS_DIR/charts.json, the PNGs (drawn by crates/benchplot) in
RESULTS_DIR/img, RESULTS_DIR/report.md, and with --docs DOCS_DIR also
DOCS_DIR/benchmarks.md with the PNGs in DOCS_DIR/img. Every number in the
report comes from the run files; nothing is typed in.
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys

WAYS = [("pre", "migrun pre-copy"), ("stop", "migrun stop-and-copy"), ("hand", "by hand (checkpoint, copy, restore)")]
WAY_LABEL = dict(WAYS)
DOCKER_WAYS = [("dmigrun", "migrun --docker-host (pre-copy)"),
               ("dhand", "by hand (docker checkpoint create, copy, docker start --checkpoint)")]
SCEN = {
    "idle": "idle (`sleep`)",
    "static": "static web (nginx, 300 files)",
    "dynamic": "dynamic web (python3 app server)",
    "cgi": "dynamic web (busybox httpd + CGI)",
    "cpu": "CPU/system (sysbench + stress-ng)",
    "redis": "redis (dataset + SET load)",
    "mem": "dirtier",
}
WEB = ["static", "dynamic", "cgi", "redis"]
TARGETS_DOWNTIME = {"idle": 150, "static": 150, "dynamic": 200}


def summ(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"med": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt(s, scale=1.0, nd=0):
    if not s:
        return "n/a"
    f = lambda v: f"{v * scale:.{nd}f}"
    if s["n"] == 1 or f(s["min"]) == f(s["max"]):
        return f(s["med"])
    return f"{f(s['med'])} ({f(s['min'])}-{f(s['max'])})"


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def client_of(r):
    return r.get("client") or {}


def group(runs, key):
    g = {}
    for r in runs:
        g.setdefault(key(r), []).append(r)
    return g


def figures(rs):
    """Medians etc. of one group of runs."""
    c = [client_of(r) for r in rs if r.get("client")]
    return {
        "n": len(rs),
        "total_ms": summ([r["total_ms"] for r in rs]),
        "downtime_ms": summ([r["downtime_ms"] for r in rs]),
        "link_bytes": summ([r["link_bytes"] for r in rs]),
        "migrun_bytes": summ([r.get("migrun_bytes") for r in rs]),
        "link_share": summ([r.get("link_share") for r in rs]),
        "rounds": summ([r.get("rounds") for r in rs]),
        "bandwidth_mbit": summ([round0_bw(r) for r in rs]),
        "throttled": sum(1 for r in rs if r.get("throttled")),
        "client": {
            "requests_per_s": summ([x.get("requests_per_s") for x in c]),
            "requests_failed": summ([x.get("requests_failed") for x in c]),
            "requests_resent_after_move": summ([x.get("requests_resent_after_move") for x in c]),
            "p50_ms": summ([x.get("latency_ms", {}).get("p50") for x in c]),
            "p99_ms": summ([x.get("latency_ms", {}).get("p99") for x in c]),
            "max_ms": summ([x.get("latency_ms", {}).get("max") for x in c]),
            "longest_stall_ms": summ([x.get("longest_stall_ms") for x in c]),
        } if c else None,
    }


def round0_bw(r):
    rounds = (r.get("stats") or {}).get("rounds") or []
    bws = [x.get("bandwidth_mbit") for x in rounds if x.get("bytes", 0) > 8 << 20]
    return max(bws) if bws else None


def timeline_panel(r, label):
    c = client_of(r)
    if not c.get("timeline"):
        return None
    t0 = r["t_start"] - c["start_epoch"]
    t1 = r["t_end"] - c["start_epoch"]
    down = (r["downtime_ms"] or 0) / 1000
    freeze = t1 - down if r["way"] not in ("hand", "dhand") else t0
    marks = [{"t": round(t0, 3), "label": "migration starts"},
             {"t": round(freeze, 3), "label": "frozen"},
             {"t": round(t1, 3), "label": "running on " + r["direction"][-1]}]
    return {"name": f"{label}: downtime {r['downtime_ms']:.0f} ms, total {r['total_ms']:.0f} ms, "
                    f"{c.get('requests_failed', 0)} failed, longest stall {c.get('longest_stall_ms') or 0:.0f} ms",
            # the last interval is cut short by the client's end: left out
            "interval_s": c["interval_s"], "ok": c["timeline"]["ok"][:-1], "failed": c["timeline"]["failed"][:-1],
            "marks": marks, "span": [round(freeze, 3), round(freeze + down, 3)]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--docs")
    ap.add_argument("--benchplot", default="target/release/benchplot")
    a = ap.parse_args()
    res = os.path.abspath(a.results)
    env = json.load(open(os.path.join(res, "env.json")))
    runs = []
    for f in sorted(glob.glob(os.path.join(res, "runs", "*.json"))):
        r = json.load(open(f))
        r["file"] = os.path.relpath(f, res)
        runs.append(r)
    failed = []
    if os.path.exists(os.path.join(res, "failed.txt")):
        failed = [l.strip() for l in open(os.path.join(res, "failed.txt")) if l.strip()]
    rel = os.path.relpath(res, os.path.dirname(os.path.abspath(a.docs)) if a.docs else res)

    summary = {"env": env, "groups": [], "failed": failed}
    docker_ran = any(r["part"] == "docker" for r in runs) or any(l.startswith("docker-") for l in failed)
    md = []
    charts = []
    mib = lambda s: fmt(s, 1 / 1048576, 1)
    pct = lambda s: fmt(s, 100, 0)

    # ------------------------------------------------------------ ways
    ways_runs = [r for r in runs if r["part"] == "ways"]
    g = group(ways_runs, lambda r: (r["scenario"], r["way"]))
    scen_order = [s for s in SCEN if any(k[0] == s for k in g)]
    rows, crows = [], []
    for s in scen_order:
        for w, wl in WAYS:
            if (s, w) not in g:
                continue
            rs = g[(s, w)]
            f = figures(rs)
            summary["groups"].append({"part": "ways", "scenario": s, "way": w, **f})
            extra = rs[0].get("mib")
            name = SCEN[s] + (f", {extra} MiB" if extra else "") + (f" at {rs[0]['dirty_mib_s']} MiB/s" if rs[0].get("dirty_mib_s") is not None else "")
            rows.append([name, wl, f["n"], fmt(f["total_ms"]), fmt(f["downtime_ms"]), mib(f["link_bytes"]),
                         pct(f["link_share"]), fmt(f["rounds"])])
            c = f["client"]
            if c:
                crows.append([SCEN[s], wl, fmt(c["requests_per_s"], 1, 0), fmt(c["requests_failed"]),
                              fmt(c["requests_resent_after_move"]), fmt(c["p50_ms"], 1, 2), fmt(c["p99_ms"], 1, 1),
                              fmt(c["max_ms"]), fmt(c["longest_stall_ms"])])
    if rows:
        md.append("## Five scenarios, three ways\n")
        md.append(f"Link {env['rate']} each way. Median (min-max) of {env['runs']} run(s) per cell; the container goes "
                  "A->B, B->A, ... and the order of the three ways rotates from run to run. *total*: from the start "
                  "of `migrate-out` (by hand: of `migrun checkpoint`) to the container running on the other host; "
                  "*downtime*: migrun's own figure (freeze on the source to running on the target), by hand the "
                  "whole checkpoint + copy + restore; *MiB on the link*: bytes through host A's link, both ways, "
                  "counted by the kernel (`/proc/net/dev`); *link share*: those bytes over what the link could carry "
                  "in the total time.\n")
        md.append(table(["scenario", "way", "n", "total (ms)", "downtime (ms)", "MiB on the link", "link share (%)",
                         "pre-copy rounds"], rows))
        md.append("")
        md.append("![downtime by scenario and way](img/bench-ways-downtime.png)\n")
        md.append("![total time by scenario and way](img/bench-ways-total.png)\n")
        for metric, title, fn in [("downtime_ms", "Downtime (ms) by scenario and way", "bench-ways-downtime.png"),
                                  ("total_ms", "Total migration time (ms) by scenario and way", "bench-ways-total.png")]:
            series = []
            for w, wl in WAYS:
                vals = []
                for s in scen_order:
                    rs = g.get((s, w))
                    v = summ([r[metric] for r in rs]) if rs else None
                    vals.append(v and {"med": v["med"], "min": v["min"], "max": v["max"]})
                if any(vals):
                    series.append({"name": wl, "values": vals})
            charts.append({"kind": "bars", "file": fn, "title": title + f" (link {env['rate']}, median, min-max)",
                           "y_label": "ms", "groups": [s for s in scen_order], "series": series})
    if crows:
        md.append("### What the client saw\n")
        loopback = "127.0.0.1" in env["client"]
        md.append("Client: " + env["client"] + ". Requests per second over the whole client window (baseline "
                  "before, the migration, 2 s after); *failed*: errors and bad answers; *re-sent*: requests whose "
                  "connection died during the move, sent again on a new connection and timed from their first "
                  "sending"
                  + (" (over the loopback of the container's old network namespace no connection can survive)"
                     if loopback else
                     " (the containers run by migrun keep their migrated TCP connections; Docker's containers get "
                     "a new address from the target daemon, so their client reconnects)")
                  + "; latency over all answered requests; *longest stall*: the longest time without any "
                  "answer.\n")
        md.append(table(["scenario", "way", "requests/s", "failed", "re-sent", "p50 (ms)", "p99 (ms)", "max (ms)",
                         "longest stall (ms)"], crows))
        md.append("")
        for s in WEB:
            panels = []
            for w, wl in WAYS:
                rs = sorted(g.get((s, w), []), key=lambda r: r["run"])
                if rs:
                    p = timeline_panel(rs[0], f"{wl}, run {rs[0]['run']} {rs[0]['direction']}")
                    if p:
                        panels.append(p)
            if panels:
                fn = f"bench-timeline-{s}.png"
                charts.append({"kind": "timeline", "file": fn, "title": f"{SCEN[s]}: requests/s every 100 ms",
                               "panels": panels})
                md.append(f"![{s} timeline](img/{fn})\n")

    # ------------------------------------------------------------ phases
    prs = [r for r in ways_runs if r["way"] == "pre" and r.get("downtime_phases")]
    if prs:
        md.append("### Where the pre-copy downtime goes\n")
        md.append("Median time (ms after the freeze) at which each step ended, from `migrate-out --stats-json` "
                  "`downtime_phases`.\n")
        names = []
        for r in prs:
            for p in r["downtime_phases"]:
                if p["name"] not in names:
                    names.append(p["name"])
        gs = group(prs, lambda r: r["scenario"])
        rows = []
        for s in scen_order:
            if s not in gs:
                continue
            row = [SCEN[s]]
            for nm in names:
                v = summ([p["at_ms"] for r in gs[s] for p in r["downtime_phases"] if p["name"] == nm])
                row.append(fmt(v, 1, 0) if v else "")
            rows.append(row)
        md.append(table(["scenario"] + names, rows))
        md.append("")

    # ------------------------------------------------------------ dirty sweep
    drs = [r for r in runs if r["part"] == "dirty"]
    if drs:
        g = group(drs, lambda r: (r["dirty_mib_s"], r["way"]))
        rates = sorted({r["dirty_mib_s"] for r in drs})
        mibs = drs[0]["mib"]
        rows = []
        for d in rates:
            for w in ("pre", "stop"):
                if (d, w) not in g:
                    continue
                f = figures(g[(d, w)])
                summary["groups"].append({"part": "dirty", "dirty_mib_s": d, "way": w, **f})
                rows.append([d, WAY_LABEL[w], f["n"], fmt(f["total_ms"]), fmt(f["downtime_ms"]),
                             mib(f["link_bytes"]), fmt(f["rounds"]), f"{f['throttled']}/{f['n']}"])
        md.append("## Dirty rate sweep\n")
        md.append(f"The dirtier (tests/programs/dirtier.c) holding {mibs} MiB and rewriting random pages at the given "
                  f"rate (0: none), link {env['rate']}. *throttled*: runs in which auto-converge capped the "
                  "container's CPU.\n")
        md.append(table(["dirty rate (MiB/s)", "way", "n", "total (ms)", "downtime (ms)", "MiB on the link",
                         "pre-copy rounds", "throttled"], rows))
        md.append("")
        for metric, fn, title in [("downtime_ms", "bench-dirty-downtime.png", "Downtime"),
                                  ("total_ms", "bench-dirty-total.png", "Total time")]:
            series = []
            for w in ("pre", "stop"):
                pts = []
                for d in rates:
                    v = summ([r[metric] for r in g.get((d, w), [])])
                    if v:
                        pts.append({"x": d, "med": v["med"], "min": v["min"], "max": v["max"]})
                if pts:
                    series.append({"name": WAY_LABEL[w], "points": pts})
            charts.append({"kind": "lines", "file": fn, "title": f"{title} vs dirty rate ({mibs} MiB, {env['rate']})",
                           "x_label": "dirty rate (MiB/s)", "y_label": "ms", "series": series})
            md.append(f"![{title} vs dirty rate](img/{fn})\n")

    # ------------------------------------------------------------ link sweep
    lrs = [r for r in runs if r["part"].startswith("link")]
    if lrs:
        g = group(lrs, lambda r: (r["link_bps"], r["way"]))
        bps = sorted({r["link_bps"] for r in lrs})
        rows = []
        for b in bps:
            for w in ("pre", "stop"):
                if (b, w) not in g:
                    continue
                rs = g[(b, w)]
                f = figures(rs)
                summary["groups"].append({"part": "link", "link_bps": b, "way": w, **f})
                rows.append([rs[0]["link_rate"], WAY_LABEL[w], f["n"], fmt(f["total_ms"]), fmt(f["downtime_ms"]),
                             mib(f["link_bytes"]), fmt(f["bandwidth_mbit"]), pct(f["link_share"])])
        m = lrs[0]
        md.append("## Link rate sweep\n")
        md.append(f"The dirtier with {m['mib']} MiB at {m['dirty_mib_s']} MiB/s, the test bed's links shaped to each rate "
                  "(tbf; the kernel has no netem, so no delay). *migrun Mbit/s*: the best bandwidth migrun measured "
                  "in a round of more than 8 MiB.\n")
        md.append(table(["link", "way", "n", "total (ms)", "downtime (ms)", "MiB on the link", "migrun Mbit/s",
                         "link share (%)"], rows))
        md.append("")
        for metric, fn, title in [("total_ms", "bench-link-total.png", "Total time"),
                                  ("downtime_ms", "bench-link-downtime.png", "Downtime")]:
            series = []
            for w in ("pre", "stop"):
                pts = []
                for b in bps:
                    v = summ([r[metric] for r in g.get((b, w), [])])
                    if v:
                        pts.append({"x": b / 1e6, "med": v["med"], "min": v["min"], "max": v["max"]})
                if pts:
                    series.append({"name": WAY_LABEL[w], "points": pts})
            charts.append({"kind": "lines", "file": fn, "log_x": True,
                           "title": f"{title} vs link rate ({m['mib']} MiB at {m['dirty_mib_s']} MiB/s)",
                           "x_label": "link rate (Mbit/s, log scale)", "y_label": "ms", "series": series})
            md.append(f"![{title} vs link rate](img/{fn})\n")

    # ------------------------------------------------------------ docker
    dks = [r for r in runs if r["part"] == "docker"]
    dfailed = [l for l in failed if l.startswith("docker-")]
    if dks or dfailed:
        g = group(dks, lambda r: (r["scenario"], r["way"]))
        scen = [s for s in SCEN if any(k[0] == s for k in g) or any(l.startswith(f"docker-{s}-") for l in dfailed)]
        rows = []
        for s in scen:
            for w, wl in DOCKER_WAYS:
                rs = g.get((s, w), [])
                fl = [l for l in dfailed if l.startswith(f"docker-{s}-{w}-")]
                if not rs:
                    if fl:
                        why = fl[0].split(": ", 1)[-1]
                        rows.append([SCEN[s], wl, 0, "failed", "", "", "", "", f"{len(fl)} failed: {why[:400]}"])
                    continue
                f = figures(rs)
                summary["groups"].append({"part": "docker", "scenario": s, "way": w, **f})
                c = f["client"]
                stopped = sum(1 for r in rs if (r.get("stats") or {}).get("client_stopped"))
                note = []
                if stopped:
                    note.append(f"{stopped}/{len(rs)} redone with the client stopped (its established TCP "
                                "connections refused)")
                na = [(r.get("stats") or {}).get("netns_after") for r in rs]
                na = [x for x in na if x]
                if na:
                    foreign = sum(1 for x in na if not x.get("docker_netns"))
                    lo = sum(1 for x in na if x.get("lo_was_down"))
                    if foreign:
                        note.append(f"network namespace on the target not the daemon's in {foreign}/{len(na)} "
                                    f"(IPv4 there: {na[0].get('ipv4') or 'none'})")
                    if lo:
                        note.append(f"loopback down on the target in {lo}/{len(na)}, brought up by the suite")
                if fl:
                    note.append(f"{len(fl)} failed: {fl[0].split(': ', 1)[-1][:400]}")
                if w == "dmigrun":
                    ls = summ([(r.get("stats") or {}).get("layers_sent") for r in rs])
                    lt = summ([(r.get("stats") or {}).get("layers_total") for r in rs])
                    if ls and lt:
                        note.append(f"layers sent: {fmt(ls)} of {fmt(lt)}")
                rows.append([SCEN[s], wl, f["n"], fmt(f["total_ms"]), fmt(f["downtime_ms"]), mib(f["link_bytes"]),
                             fmt(c["requests_failed"]) if c else "no client",
                             fmt(c["longest_stall_ms"]) if c else "", "; ".join(note)])
        md.append("## Docker to Docker\n")
        md.append(f"Each scenario run under Docker (`docker run --runtime=migrun`) on daemon A and moved between "
                  f"the project's two dockerds on this host (A: `make docker-up`, B: `make docker-up-b`), the "
                  f"transfer over the test bed's link ({env['rate']}, between mr-host-a and mr-host-b). "
                  "Median (min-max) of the runs; the container goes A->B, B->A, ... and the order of the two ways "
                  "rotates from run to run. *migrun --docker-host*: `migrate-out --docker-host` on the source, "
                  "`migrate-in --docker-host` on the target, pre-copy (Docker's seccomp profile forbids "
                  "`userfaultfd`, so dirty pages are tracked by page hashing); *downtime* is migrun's own figure. "
                  "*By hand*: `docker checkpoint create --checkpoint-dir` on the source, the checkpoint and the "
                  "container's writable layer (overlay2's upper dir: files the processes hold open there must exist "
                  "on the target) through the link with `tar | socat`, `docker create` of the same image, command "
                  "and config on the target, the layer copied into the new container's upper dir, and "
                  "`docker start --checkpoint` (the checkpoint moved into the container's checkpoint directory: "
                  "Docker 20.10 refuses `start --checkpoint-dir`); its downtime is from `checkpoint create` to "
                  "`start` returning. **The image is present on both daemons** before the runs (imported into A "
                  "from the scenario's root filesystem, `docker save | docker load` into B: the same image id, as "
                  "after a registry pull), so neither way moves the image: migrun sends no layer, the by-hand route "
                  "only the checkpoint. **Docker containers get a fresh network on the target**: the target daemon "
                  "makes a new network namespace (its own bridge and address), so the client's connections into "
                  "the old namespace end with the move and are made again in the new one (what the restored "
                  "processes actually run in is checked after each move, see below and *notes*). Docker's `checkpoint create` passes no "
                  "`--tcp-established`, and a restore through the target daemon cannot take established "
                  "connections either: a migration refused for the client's established connections is done "
                  "again with the client stopped, and then has no client figures (see *notes*). After each move "
                  "the suite looks at the container's network namespace on the target: whether it is the one the "
                  "daemon made (`SandboxKey`), its IPv4 addresses, and whether its loopback is up (if not, the "
                  "suite brings it up so that the scenario's server and the client can go on; the client's stall "
                  "then includes that).\n")
        md.append(table(["scenario", "way", "n", "total (ms)", "downtime (ms)", "MiB on the link", "failed requests",
                         "longest stall (ms)", "notes"], rows))
        md.append("")
        dscen = [s for s in scen if any(k[0] == s for k in g)]
        if dscen:
            series = []
            for w, wl in DOCKER_WAYS:
                vals = []
                for s in dscen:
                    v = summ([r["downtime_ms"] for r in g.get((s, w), [])])
                    vals.append(v and {"med": v["med"], "min": v["min"], "max": v["max"]})
                if any(vals):
                    series.append({"name": wl, "values": vals})
            charts.append({"kind": "bars", "file": "bench-docker-downtime.png",
                           "title": f"Docker to Docker: downtime (ms) by scenario and way (link {env['rate']}, "
                                    "median, min-max)",
                           "y_label": "ms", "groups": dscen, "series": series})
            md.append("![Docker to Docker downtime](img/bench-docker-downtime.png)\n")

    # ------------------------------------------------------------ targets
    checks = []

    def check(ok, text):
        checks.append(("PASS" if ok else "MISS", text))

    wg = group(ways_runs, lambda r: (r["scenario"], r["way"]))
    for s, lim in TARGETS_DOWNTIME.items():
        rs = wg.get((s, "pre"))
        if rs:
            v = summ([r["downtime_ms"] for r in rs])
            check(v["med"] <= lim, f"{s}: pre-copy downtime <= {lim} ms: median {v['med']:.0f} ms (max {v['max']:.0f})")
    rs = wg.get(("dynamic", "pre"))
    if rs:
        nf = sum(client_of(r).get("requests_failed", 0) for r in rs)
        check(nf == 0, f"dynamic: zero failed requests with pre-copy: {nf} failed in {len(rs)} run(s)")
    mem64 = [r for r in drs if r["dirty_mib_s"] == 64 and r["way"] == "pre"]
    mem64 += [r for r in ways_runs if r["scenario"] == "mem" and r["way"] == "pre" and r.get("dirty_mib_s") == 64]
    if mem64:
        v = summ([r["downtime_ms"] for r in mem64])
        check(v["med"] <= 300, f"dirtier {mem64[0]['mib']} MiB at 64 MiB/s: pre-copy downtime <= 300 ms: "
                               f"median {v['med']:.0f} ms (max {v['max']:.0f})")
    tot = group([r for r in drs + lrs if r["way"] == "pre"], lambda r: (r["part"], r["mib"], r["dirty_mib_s"], r["link_bps"]))
    for (part, mb, d, b), rs in sorted(tot.items()):
        link_mib_s = b / 8 / 1048576
        if d >= link_mib_s / 3:
            continue
        ideal = mb * 1048576 * 8 / b * 1000
        v = summ([r["total_ms"] for r in rs])
        check(v["med"] <= 1.3 * ideal, f"{part}, {mb} MiB at {d} MiB/s over {rs[0]['link_rate']}: total <= 1.3 x "
                                       f"memory/bandwidth = {1.3 * ideal:.0f} ms: median {v['med']:.0f} ms")
        by = summ([r["link_bytes"] for r in rs])
        check(by["med"] <= 1.2 * mb * 1048576, f"{part}, {mb} MiB at {d} MiB/s over {rs[0]['link_rate']}: bytes on "
                                               f"the link <= 1.2 x {mb} MiB: median {by['med'] / 1048576:.0f} MiB")
    summary["targets"] = [{"verdict": v, "check": t} for v, t in checks]

    # ------------------------------------------------------------ write
    json.dump({"charts": charts}, open(os.path.join(res, "charts.json"), "w"), indent=1)
    img = os.path.join(res, "img")
    if charts:
        p = subprocess.run([a.benchplot, os.path.join(res, "charts.json"), img], check=False)
        if p.returncode != 0:
            print("report.py: benchplot failed", file=sys.stderr)
            return 1
    json.dump(summary, open(os.path.join(res, "summary.json"), "w"), indent=1)

    head = ["# migrun live-migration benchmarks\n"]
    head.append(f"{'Quick run (`make bench-quick`)' if env['quick'] else 'Full run (`make bench`)'} of "
                f"{env['date']}, {len(runs)} migrations in {env['duration_s']} s. Results: "
                f"[`{rel}`]({rel}) (one JSON per migration in `runs/`, `summary.json`, logs). "
                "Regenerate with `make bench` (the full suite) or `make bench-quick` (the short one); "
                "`hack/bench/suite.sh --help` tells every knob.\n")
    head.append("## Machine\n")
    head.append(table(["what", "value"], [
        ["machine", f"{env['cpu']}, {env['memory']}"], ["OS", env["os"]], ["kernel", env["kernel"]],
        ["CRIU", env["criu"]],
        ["dirty-page tracking", ", ".join(sorted({r.get('dirty_tracking') for r in runs if r.get('dirty_tracking') and r['dirty_tracking'] != 'none'})) or "n/a"],
        ["load average (1, 5, 15 min)", f"{env['load_average_start']} at the start, {env['load_average_end']} at the end "
                                        "(2 cores shared with other work: timings are noisy)"],
        ["migrun", f"{env['commit']}"], ["client", env["client"]], ["images (MiB)", env["images"]],
    ]))
    head.append("")
    head.append("Test bed: `hack/testbed.sh`, hosts A and B as network namespaces on a bridge, each host's link "
                "shaped with tbf both ways; no netem in this kernel, so no added delay. Workload images are "
                "Debian bookworm (mmdebstrap, `hack/bench/images.sh`) or busybox-static trees, used as the lower "
                "layer of an overlay root filesystem; before the measured runs a `sleep` container on the same "
                "image goes A->B->A once, so that both hosts hold the layer (as after a `docker pull`). UnixBench "
                "is not packaged in Debian: sysbench and stress-ng stand in for it. The by-hand route stands in for "
                "Docker's `docker checkpoint create` / copy / `docker start --checkpoint` for containers run by "
                "migrun: `migrun checkpoint --tcp-established`, `tar | socat` of the image dir, the overlay's "
                "upper dir and config.json over the test-bed link, `migrun restore` on the other host"
                + ("; Docker's own route is measured in *Docker to Docker* below.\n" if docker_ran else ".\n"))
    tail = ["## Known limits\n"]
    if "127.0.0.1" in env["client"]:
        tail.append("- This run's client reached the service over the loopback of the container's own network "
                    "namespace (entered with setns from the host, `BENCH_SERVICE_ADDR` set empty): a connection "
                    "into the old namespace cannot survive the move, so its request is sent again (*re-sent*).\n")
    else:
        tail.append("- Containers run by migrun serve the client from a service address on the test bed "
                    "(`hack/netctr.sh`): migrate-in, and by hand `migrun restore --bridge`, plug the restored veth "
                    "into the target host's bridge inside the restore and the container announces its address "
                    "with gratuitous ARP; the client's TCP connections move with it.\n")
    tail.append("- A server that takes one connection per request (busybox httpd + CGI, scenario `cgi`, not in "
                "the default list) under load: CRIU refuses connections still in the listening socket's accept "
                "queue (`inet: In-flight connection`) unless told to skip them; migrate-out passes "
                "`--skip-in-flight` (such a client connects again), `migrun checkpoint` does as runc and does not. "
                "The dynamic-web scenario uses a keep-alive app server.\n"
                + ("- Docker's two daemons run on one host (their transfers go through the test bed's link); the "
                   "Docker containers' client runs in their network namespace, over its loopback, found through "
                   "each daemon's inspect (Engine API) again after the move.\n" if docker_ran else
                   "- Docker's own route (`docker checkpoint create`, copy, `docker start --checkpoint`) is not run "
                   "here (the suite's part `docker`, which needs `make docker-up docker-up-b`); the by-hand route "
                   "runs the same steps with migrun's CLI.\n"))
    foreign = [r for r in runs if r["part"] == "docker"
               and ((r.get("stats") or {}).get("netns_after") or {}).get("docker_netns") is False]
    if foreign:
        tail.append(f"- In {len(foreign)} of {sum(1 for r in runs if r['part'] == 'docker')} Docker moves the "
                    "restored processes did not run in the network namespace the target daemon made for the "
                    "container (`docker inspect`'s `SandboxKey`): it had no address from the daemon's bridge "
                    "(see *notes*), so the container was reachable only on its loopback, which is what the client "
                    "uses here.\n")
    tail.append("## Targets (issue 7)\n")
    tail.append("\n".join(f"- {v}: {t}" for v, t in checks) if checks else "- no figures for the targets in this run")
    tail.append("")
    if failed:
        tail.append("## Failures\n")
        tail.append("\n".join(f"- {l}" for l in failed))
        tail.append("")
    text = "\n".join(head + md + tail) + "\n"
    open(os.path.join(res, "report.md"), "w").write(text.replace("](img/", "](img/"))
    if a.docs:
        os.makedirs(os.path.join(a.docs, "img"), exist_ok=True)
        for c in charts:
            shutil.copy(os.path.join(img, c["file"]), os.path.join(a.docs, "img", c["file"]))
        open(os.path.join(a.docs, "benchmarks.md"), "w").write(text)
        print(f"report.py: wrote {os.path.join(a.docs, 'benchmarks.md')}", file=sys.stderr)
    print("\n".join(f"{v}: {t}" for v, t in checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
