"""bench/results/*.json -> bench/RESULTS.md (tables: min / median / max, ratios to the peer of the same run) + bench/plots/*.png.

python bench/report.py            # the newest result of each benchmark (convergence: of each recipe), with its plot
python bench/report.py --all      # every result, not only the newest of each benchmark
"""

from __future__ import annotations

import json
from pathlib import Path

from common import BENCH_DIR, base_parser, parse_args

PLOTS = BENCH_DIR / "plots"
ORDER = (
    "step_vs_trl",
    "convergence",
    "eval_speed",
    "memory_7b",
    "hardware",
    "onnx_speed",
    "deploy_clients",
    "decode_vs_trained",
)


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(fmt(c) for c in r) + " |" for r in rows
    ]


def mmm(st: dict | None) -> list:
    st = st or {}
    return [st.get("min"), st.get("median"), st.get("max")]


def header(d: dict, path: Path) -> list[str]:
    m, v = d["machine"], d["machine"]["versions"]
    libs = ", ".join(
        f"{k} {v[k]}" for k in ("torch", "transformers", "peft", "bitsandbytes", "trl", "onnxruntime") if v.get(k)
    )
    out = [
        f"### {d['bench']} — {d['created']} (`{path.name}`)",
        "",
        f"{m['cpu']['model']}, {m['cores_usable']} usable cores, {m['memory_gib']} GiB, load {m['load_avg_1_5_15']}; {libs}; "
        f"git {str(m['git']['commit'])[:10]}{' (dirty)' if m['git']['dirty'] else ''}",
        "",
        f"`{d['command']}`",
        "",
    ]
    if d["settings"].get("quick"):
        out += ["> **--quick smoke run: the numbers are meaningless.**", ""]
    return out


# ----------------------------------------------------------------------------- one section per benchmark


def step_vs_trl(r: dict) -> list[str]:
    peers = [p for p in ("iq", "trl", "sdft") if p in r]
    keys = [
        ("seconds", "s / step"),
        ("t_rollout", "rollout s"),
        ("t_estimator", "estimator / reference s"),
        ("t_update", "update s"),
        ("gen_tokens_per_s_step", "generated tokens / s (step)"),
        ("gen_tokens_per_s_rollout", "generated tokens / s (rollout)"),
        ("gen_tokens_per_step", "generated tokens / step"),
        ("warmup_seconds", "warm-up step s"),
        ("peak_rss_gib", "peak RSS GiB"),
        ("load_peak_rss_gib", "peak RSS when loading ended GiB"),
        ("peak_rss_rollout_gib", "peak RSS in rollout GiB (sampled)"),
        ("peak_rss_estimator_gib", "peak RSS in estimator / reference GiB (sampled)"),
        ("peak_rss_update_gib", "peak RSS in update GiB (sampled)"),
    ]
    others = [p for p in peers if p != "iq"] if "iq" in peers else []
    head = (
        ["metric"]
        + [f"{p} {s}" for p in peers for s in ("min", "median", "max")]
        + [f"iq / {p} (median)" for p in others]
    )
    rows = []
    for k, label in keys:
        if not any(k in r[p] for p in peers):  # per-phase RSS: results from 2026-11-28 on
            continue
        row = [label] + [x for p in peers for x in mmm(r[p].get(k))]
        for p in others:
            a, b = (r["iq"].get(k) or {}).get("median"), (r[p].get(k) or {}).get("median")
            row.append(round(a / b, 3) if a is not None and b else None)
        rows.append(row)
    out = (
        table(head, rows)
        + [""]
        + [
            f"- {p}: optimizer `{r[p]['optimizer']}`, compute dtype {r[p]['compute_dtype']}, {r[p].get('linear4bit_layers')} "
            f"4-bit layers ({r[p].get('repacked_layers')} repacked), {fmt(r[p].get('trainable_params'))} trainable params"
            for p in peers
        ]
    )
    if "targets" in r:
        t = r["targets"]
        out.append(
            f"- targets: step time ≤ {t['step_time_ratio_max']}× TRL: {fmt(t['step_time_met'])}; "
            f"peak RSS ≤ {t['peak_rss_ratio_max']}× TRL: {fmt(t['peak_rss_met'])}"
        )
        if "peer_step_time_met" in t:
            out.append(
                f"- peer-benchmark targets (TRL 1.16): step time ≤ {t['peer_step_time_ratio_max']}× GRPO: {fmt(t['peer_step_time_met'])}; "
                f"peak RSS ≤ {t['peer_peak_rss_ratio_max']}× GRPO: {fmt(t['peer_peak_rss_met'])}"
            )
    return out


def convergence(r: dict) -> list[str]:
    peers = [p for p in ("iq-distill", "iq-pg", "iq-imitation", "trl-grpo", "trl-sdft") if p in r]
    med = lambda q, k: (q.get(k) or {}).get("median")  # noqa: E731
    out = []
    if "time_to_quality_iq_over_trl" in r:  # convergence v2 (2026-11-30 on): quality columns and time to target quality
        head = [
            "peer",
            "final judge min",
            "median",
            "max",
            "baseline judge",
            "repetition",
            "loop rate",
            "mean tokens",
            "principle score",
            "KL(π̂*‖π_θ)",
            "KL(π_θ‖π_ref)",
            "time to quality s (median †)",
            "runs reached",
            "samples to quality (median †)",
            "clock s",
            "steps",
        ]
        rows = []
        for p in peers:
            q, t = r[p], r[p]["time_to_quality_s"]
            rows.append(
                [
                    p,
                    *mmm(q["final_judge_rate"]),
                    med(q, "baseline_judge_rate"),
                    med(q, "final_repetition"),
                    med(q, "final_loop_rate"),
                    med(q, "final_mean_tokens"),
                    med(q, "final_principle_score"),
                    med(q, "final_kl_to_target"),
                    med(q, "final_kl_per_token"),
                    t.get("median_never_as_inf"),
                    f"{t.get('reached', '-')}/{q['final_judge_rate']['n']}",
                    q["samples_to_quality"].get("median_never_as_inf"),
                    med(q, "clock_s"),
                    med(q, "steps"),
                ]
            )
        rows.append(
            [
                "contrastive decoding (π̂*)",
                *mmm(r["contrastive_judge_rate"]),
                None,
                med(r, "contrastive_repetition"),
                med(r, "contrastive_loop_rate"),
                med(r, "contrastive_mean_tokens"),
                med(r, "contrastive_principle_score"),
                0.0,
                0.0,
                None,
                None,
                None,
                None,
                None,
            ]
        )
        out += table(head, rows) + [
            "",
            "Final = the last evaluation (medians over runs). † time / samples to target quality (judge and "
            "repetition bars in the notes); runs that never got there count as infinitely slow.",
            "",
        ]
        ratios = r["time_to_quality_iq_over_trl"]
        trl = sorted({t for v in ratios.values() for t in v})
        if trl:

            def cell(p, t, key, q):  # a ratio, or why there is none
                mine, theirs = r[p][key].get("median_never_as_inf"), r[t][key].get("median_never_as_inf")
                return (
                    q
                    if q is not None
                    else (
                        "both never"
                        if mine is None and theirs is None
                        else f"{t} never (0/{len(r['raw'][t])})"
                        if theirs is None
                        else f"{p} never"
                    )
                )

            out += table(
                ["Inverse-Q* loss"]
                + [f"time to quality / {t}" for t in trl]
                + [f"samples to quality / {t}" for t in trl],
                [
                    [
                        p,
                        *(cell(p, t, "time_to_quality_s", ratios[p].get(t)) for t in trl),
                        *(cell(p, t, "samples_to_quality", r["samples_to_quality_iq_over_trl"][p].get(t)) for t in trl),
                    ]
                    for p in ratios
                ],
            ) + [""]
        for p in peers:
            for b in r[p].get("best_points_of_runs_not_reaching", []):
                out.append(
                    f"- {p}: a run that never reached target quality; its best point: judge {fmt(b['judge_rate'])}, repetition "
                    f"{fmt(b['repetition'])}, loops {fmt(b.get('loop_rate'))} at {fmt(b['train_seconds'])} s (step {b['step']})"
                )
        for t, v in r.get("to_peer_final_quality", {}).items():
            best = " (the best peer)" if r.get("best_peer") == t else ""
            out.append(
                f"- to {t}'s final quality{best} (judge ≥ {fmt(v['peer_final_judge_rate'])}, repetition ≤ {fmt(v['peer_final_repetition'])}; "
                f"its median clock {fmt(v['peer_clock_s'])} s): "
                + "; ".join(
                    f"{p} {fmt(v[p]['median_never_as_inf'])} s ({v[p]['reached']}/{len(r['raw'][p])} runs) = "
                    f"{fmt(v[p]['over_peer_clock'])}× its clock, ≤ 0.5×: {fmt(v[p]['met_0.5x'])}"
                    for p in v
                    if p in peers and p.startswith("iq-")
                )
            )
        out.append(f"- fastest Inverse-Q* loss per second (Δ judge rate / training s): {r.get('winner_per_second')}")
        return out
    ratios = r.get("ratios_iq_over_trl", {})
    head = [
        "peer",
        "final judge rate min",
        "median",
        "max",
        "baseline (median)",
        "time to TRL final s min",
        "median †",
        "max",
        "runs reached",
        "Δ judge rate / s (median)",
        "clock s (median)",
        "samples (median)",
        "final repetition (median)",
        "time to TRL final iq / trl",
    ]
    rows = []
    for p in peers:
        q, t = r[p], r[p].get("time_to_trl_final_s") or {}
        rows.append(
            [
                p,
                *mmm(q["final_judge_rate"]),
                q["baseline_judge_rate"]["median"],
                t.get("min"),
                t.get("median_never_as_inf"),
                t.get("max"),
                f"{t.get('reached', '-')}/{q['final_judge_rate']['n']}",
                q["judge_rate_per_s"]["median"],
                q["clock_s"]["median"],
                q["samples"]["median"],
                q["final_repetition"]["median"],
                ratios.get(p, {}).get("time_to_trl_final"),
            ]
        )
    out = table(head, rows) + [
        "",
        "† runs that never reached TRL's final median judge rate count as infinitely slow; min / max over the runs that did.",
        f"- principle-contrastive decoding of the untrained model (α={r['contrastive'][0]['alpha']}): judge rate "
        f"{fmt(r['contrastive_judge_rate']['median'])}; TRL GRPO final median: {fmt(r.get('trl_final_judge_rate_median'))}",
        f"- fastest Inverse-Q* loss per second (Δ judge rate / training s): {r.get('winner_per_second')}",
    ]
    if "targets" in r:
        t = r["targets"]
        out.append(
            f"- target: Inverse-Q* reaches TRL GRPO's final median judge rate within TRL's clock ({fmt(t['trl_clock_s_median'])} s): "
            + "; ".join(f"{p}: {fmt(t[f'{p}_met'])}" for p in peers if f"{p}_met" in t)
            + ("" if t.get("trl_improved", True) else " (TRL did not improve on its baseline: reaching it is trivial)")
        )
    return out


def hardware(r: dict) -> list[str]:
    rows = [[f"matmul {k} GFLOP/s", *mmm(v)] for k, v in r["matmul_gflops"].items()]
    rows += [
        [f"memory {k} GB/s ({r['bandwidth_gbs']['mib']} MiB)", *mmm(r["bandwidth_gbs"][k])] for k in ("copy", "read")
    ]
    u = r["utilisation"]
    rows += [
        [f"run: {k}", *mmm(u[k])]
        for k in (
            "update_gflops_6N",
            "update_gflops_4N",
            "estimator_gflops",
            "gen_tokens_per_s",
            "rollout_gbs_packed",
            "rollout_gbs_dequant",
        )
    ]
    out = table(["measure", "min", "median", "max"], rows) + [""]
    out += [
        f"- update MFU (6N) {fmt(u['mfu_update_6N_vs_measured_peak'])}, (4N) {fmt(u['mfu_update_4N_vs_measured_peak'])}; estimator MFU "
        f"{fmt(u['mfu_estimator_vs_measured_peak'])} — of the measured {u['peak_used']['compute_dtype']} peak {fmt(u['peak_used']['gflops'])} GFLOP/s",
        f"- rollout bandwidth utilisation: {fmt(u['rollout_bw_util_packed'])} (NF4 bytes), {fmt(u['rollout_bw_util_dequant'])} (with the bf16 "
        f"dequantize round trip) of {fmt(u['peak_used']['copy_gbs'])} GB/s; run: {r['run']['metrics']}",
    ]
    if "profile" in r:
        out += ["", "Top ops by self CPU time (one step):", ""]
        out += table(
            ["op", "calls", "self CPU ms", "CPU total ms"],
            [[e["op"], e["calls"], e["self_cpu_ms"], e["cpu_total_ms"]] for e in r["profile"]["top_self_cpu"]],
        )
    return out


def per_batch(speed: dict, ratios: dict, ratio_key) -> list[list]:
    rows = []
    for name, by_batch in speed.items():
        for b, st in by_batch.items():
            st = st.get("tokens_per_s", st)
            rows.append([name, b.replace("batch_", ""), *mmm(st), ratios.get(b, {}).get(ratio_key(name))])
    return rows


def onnx_speed(r: dict) -> list[str]:
    head = ["backend", "batch", "tokens/s min", "median", "max", "× pytorch (median)"]
    out = table(
        head,
        per_batch(
            r["tokens_per_s"],
            r["ratios"],
            lambda n: {"onnx": "onnx_over_pytorch", "onnx-int8": "int8_over_pytorch"}.get(n, f"{n}_over_pytorch"),
        ),
    )
    out += [""] + [
        f"- batch {b[6:]}: int8 / fp32 ONNX = {fmt(v['int8_over_onnx'])}"
        + "".join(
            f", {k[: -len('_over_onnx')]} / fp32 ONNX = {fmt(x)}"
            for k, x in v.items()
            if k.endswith("_over_onnx") and k != "int8_over_onnx"
        )
        for b, v in r["ratios"].items()
    ]
    out += [
        "- top-1 agreement with the merged model: "
        + ", ".join(f"{k} {fmt(v['agreement'])} ({v['agree']}/{v['total']})" for k, v in r["agreement"].items()),
        f"- batched greedy = batch-1 generate on {fmt(r['bench_loop_matches_package_generate'])} of rows",
    ]
    t = r["targets"]
    out.append(
        f"- targets: ONNX ≥ {t['onnx_over_pytorch_min']}× PyTorch, int8 ≥ {t['int8_over_onnx_min']}× fp32 ONNX, agreement ≥ {t['int8_agreement_min']}: "
        + "; ".join(
            f"{k}: ONNX {fmt(v['onnx_met'])}, int8 speed {fmt(v['int8_speed_met'])}"
            for k, v in t.items()
            if k.startswith("batch_")
        )
        + f"; agreement {fmt(t['int8_agreement_met'])}"
    )
    return out


def deploy_clients(r: dict) -> list[str]:
    rows = [
        [name, r["clients"][name], *mmm(by_batch["batch_1"]), r["over_pytorch"][name], r["same_tokens"][name]]
        for name, by_batch in r["tokens_per_s"].items()
    ]
    return table(
        ["client", "what", "tokens/s min", "median", "max", "× pytorch (median)", "same tokens as pytorch"], rows
    )


def onnx_speed_over_runs(runs: list[tuple[Path, dict]]) -> list[str]:
    """Ratios and agreement as min / median / max over the runs (each run's own medians) of the newest settings with >= 2 runs."""
    import statistics

    key = lambda d: json.dumps({k: v for k, v in d["settings"].items() if k != "prompt_tokens"}, sort_keys=True)  # noqa: E731
    groups: dict[str, list[tuple[Path, dict]]] = {}
    for path, d in runs:  # newest first
        groups.setdefault(key(d), []).append((path, d))
    same = next((g for g in groups.values() if len(g) >= 2), None)
    if same is None:
        return []
    res = [d["results"] for _, d in same]

    def row(label, vals):
        vals = [v for v in vals if v is not None]
        return (
            [label, len(vals), min(vals), statistics.median(vals), max(vals)] if vals else [label, 0, None, None, None]
        )

    rows = [
        row(f"{k} (batch {b[6:]})", [r["ratios"].get(b, {}).get(k) for r in res])
        for b in res[0]["ratios"]
        for k in res[0]["ratios"][b]
    ]
    for b in res[0]["ratios"]:  # int8 over its own fp32 graph, e.g. genai-int8 / genai
        for k in res[0]["ratios"][b]:
            base = k[: -len("-int8_over_onnx")] if k.endswith("-int8_over_onnx") else None
            if base and f"{base}_over_onnx" in res[0]["ratios"][b]:
                rows.append(
                    row(
                        f"{base}-int8 / {base} (batch {b[6:]})",
                        [
                            r["ratios"][b][k] / r["ratios"][b][f"{base}_over_onnx"]
                            for r in res
                            if k in r["ratios"].get(b, {})
                        ],
                    )
                )
    rows += [
        row(f"top-1 agreement {k}", [r["agreement"].get(k, {}).get("agreement") for r in res])
        for k in res[0]["agreement"]
    ]
    names = ", ".join(f"`{p.name}`" for p, _ in same)
    return (
        [f"### onnx_speed over {len(same)} runs (same settings: {names})", ""]
        + table(["ratio", "runs", "min", "median", "max"], rows)
        + [""]
    )


def decode_vs_trained(r: dict) -> list[str]:
    head = ["decoder", "batch", "tokens/s min", "median", "max", "× contrastive (median)"]
    out = table(head, per_batch(r["tokens_per_s"], r["ratios"], lambda n: f"{n}_over_contrastive")) + [""]
    if r["quality"]:
        keys = [
            "principle_score",
            "judge_rate",
            "judge_rate_harmful",
            "judge_rate_benign",
            "kl_per_token",
            "mean_tokens",
            "n",
        ]
        out += table(["evaluation"] + keys, [[name] + [q.get(k) for k in keys] for name, q in r["quality"].items()])
    return out


def memory_7b(r: dict) -> list[str]:
    variants = list(r)
    keys = [
        "step_peak_rss_gib",
        "load_peak_rss_gib",
        "rss_after_load",
        "weights_4bit",
        "weights_unquantized",
        "weights_mapped",
        "weights_mapped_resident",
        "lora",
        "lora_grads",
        "optimizer_state",
        "rollout_transient",
        "estimator_transient",
        "update_transient",
    ]
    rows = []
    for k in keys:
        vals = [[run.get(k, run["split_gib"].get(k, 0.0)) for run in r[v]["runs"]] for v in variants]
        rows.append(
            [k.replace("_", " ") + ("" if k.endswith("gib") else " GiB")]
            + [x for vs in vals for x in (min(vs), sorted(vs)[len(vs) // 2], max(vs))]
        )
    for k in ("peak", "weights", "lora+grad+optimizer", "kv_cache", "activations", "logits", "runtime"):
        rows.append(
            [f"dry-run estimate: {k} GiB"] + [x for v in variants for x in [r[v]["runs"][0]["estimate_gib"][k]] * 3]
        )
    rows.append(
        ["estimate error (est - measured) / measured"]
        + [x for v in variants for x in [run["estimate_error"] for run in r[v]["runs"][:1]] * 3]
    )
    gpu = r[variants[0]]["runs"][0].get("device_memory_gib")
    if gpu:  # CUDA run: "rss" rows are bytes allocated by PyTorch on the GPU; add what the allocator and the card held
        for k, label in (
            ("max_reserved", "GPU reserved by the allocator (peak) GiB"),
            ("device_used", "GPU used as the card reports it (incl. CUDA context) GiB"),
        ):
            rows.insert(
                1,
                [label]
                + [x for v in variants for x in [run["device_memory_gib"][k] for run in r[v]["runs"]] * 3][
                    : 3 * len(variants)
                ],
            )
    out = table(["measure"] + [f"{v} {s}" for v in variants for s in ("min", "median", "max")], rows) + [""]
    if gpu:
        out.append(
            f"- **CUDA run on {gpu['device_name']}** ({gpu['device_total']} GiB): 'rss' rows are PyTorch's allocated bytes on the GPU."
        )

    def median_peak(v):
        return sorted(run["step_peak_rss_gib"] for run in r[v]["runs"])[len(r[v]["runs"]) // 2]

    for v in variants[1:]:
        out.append(
            f"- step peak {v} / {variants[0]} (medians, same run): {fmt(median_peak(v) / median_peak(variants[0]))}"
        )
    for v in variants:
        run = r[v]["runs"][0]
        out.append(
            f"- {v}: unquantized parts in {run['unquantized_dtype']}; step peak ≤ 6 GiB: {fmt(run['target_met'])}; "
            f"phase seconds {run['phase_seconds']}; load {run['load_s']} s"
        )
    return out


def eval_speed(r: dict) -> list[str]:
    keys = (
        "seconds",
        "judge_rate",
        "principle_score",
        "kl_to_target",
        "kl_per_token",
        "repetition",
        "loop_rate",
        "mean_tokens",
    )
    rows = [[name, *[fmt(r[name].get(k)) for k in keys]] for name in ("contrastive", "before", "after") if name in r]
    return table(["row", *keys], rows) + [
        "",
        f"total: {fmt(r.get('total_seconds'))} s, code at {r.get('code_rev') or '?'}",
    ]


SECTIONS = {
    "eval_speed": eval_speed,
    "deploy_clients": deploy_clients,
    "step_vs_trl": step_vs_trl,
    "memory_7b": memory_7b,
    "convergence": convergence,
    "hardware": hardware,
    "onnx_speed": onnx_speed,
    "decode_vs_trained": decode_vs_trained,
}


# ----------------------------------------------------------------------------- plots


def plot_convergence(
    axes, r: dict, y: str = "judge_rate", ylabel: str = "judge rate, held-out, principle absent"
) -> None:
    """``y`` vs training seconds and vs responses generated: every run faint, the median over runs at each evaluation bold."""
    import statistics

    for i, (peer, runs) in enumerate(r["raw"].items()):
        curves = [[q for q in run["curve"] if q.get(y) is not None] for run in runs]
        if not all(curves):
            continue
        for ax, x in zip(axes, ("train_seconds", "samples_seen")):
            for c in curves:
                ax.plot([q[x] for q in c], [q[y] for q in c], color=f"C{i}", alpha=0.25, lw=0.8)
            at = [[c[j] for c in curves if j < len(c)] for j in range(max(map(len, curves)))]
            ax.plot(
                [statistics.median(q[x] for q in pts) for pts in at],
                [statistics.median(q[y] for q in pts) for pts in at],
                color=f"C{i}",
                marker="o",
                ms=3,
                label=peer,
            )
    ref = r.get(f"contrastive_{y}", {}).get("median")
    for ax, xlabel in zip(axes, ("training seconds (evaluation excluded)", "responses generated")):
        if ref is not None:
            ax.axhline(ref, color="gray", ls="--", label="contrastive decoding (untrained)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if y in ("judge_rate", "loop_rate"):
            ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)


def plot(d: dict) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (see bench/README.md): no plots")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, name = d["results"], d["bench"]
    two = name in ("step_vs_trl", "convergence")
    rows = 3 if name == "convergence" and "time_to_quality_iq_over_trl" in r else 1  # v2: loop rate and KL to pi* too
    fig, axes = plt.subplots(rows, 2 if two else 1, figsize=(10 if two else 7, 4 * rows), squeeze=False)
    ax = axes[0][0]
    if name == "step_vs_trl":
        peers = [p for p in ("iq", "trl", "sdft") if p in r]
        bottom = [0.0] * len(peers)
        for phase in ("t_rollout", "t_estimator", "t_update"):
            vals = [r[p][phase]["median"] for p in peers]
            ax.bar(peers, vals, bottom=bottom, label=phase[2:])
            bottom = [a + b for a, b in zip(bottom, vals)]
        ax.set_ylabel("median s / step")
        ax.legend()
        axes[0][1].bar(peers, [r[p]["peak_rss_gib"]["median"] for p in peers], color="gray")
        axes[0][1].set_ylabel("peak RSS GiB")
    elif name == "convergence":
        plot_convergence(axes[0], r)
        if rows == 3:
            plot_convergence(axes[1], r, "loop_rate", "loop rate, held-out")
            plot_convergence(axes[2], r, "kl_to_target", "KL(π̂*‖π_θ) per token on π̂*'s answers")
    elif name == "hardware":
        ax.bar(list(r["matmul_gflops"]), [v["median"] for v in r["matmul_gflops"].values()])
        ax.set_ylabel("matmul GFLOP/s (median)")
    elif name in ("onnx_speed", "decode_vs_trained"):
        speed = r["tokens_per_s"]
        batches = sorted({b for v in speed.values() for b in v}, key=lambda b: int(b[6:]))
        width = 0.8 / len(speed)
        for i, (backend, by_batch) in enumerate(speed.items()):
            vals = [by_batch.get(b, {}).get("tokens_per_s", by_batch.get(b, {})).get("median") or 0 for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], vals, width, label=backend)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [b.replace("_", " ") for b in batches])
        ax.set_ylabel("tokens/s (median)")
        ax.legend(fontsize=8)
    else:
        plt.close(fig)
        return None
    recipe = d["settings"].get("recipe") if name == "convergence" else None
    other = recipe not in (None, "smollm2_cpu")  # the French recipe keeps the plain name
    fig.suptitle(
        f"{name}{f' ({recipe})' if recipe else ''} — {d['created']}"
        + (" (--quick)" if d["settings"].get("quick") else "")
    )
    fig.tight_layout()
    PLOTS.mkdir(exist_ok=True)
    path = PLOTS / (f"{name}-{recipe}.png" if other else f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = base_parser("Render bench/results/*.json into bench/RESULTS.md and bench/plots/.")
    p.add_argument(
        "--all", action="store_true", help="every result, not only the newest of each benchmark (and recipe)"
    )
    p.add_argument("--no-plots", action="store_true")
    args = parse_args(p, {})
    files = sorted(args.results.glob("*.json"), reverse=True)  # names end in a timestamp: newest first
    by_bench: dict[str, list[tuple[Path, dict]]] = {}
    for f in files:
        d = json.loads(f.read_text())
        by_bench.setdefault(d["bench"], []).append((f, d))
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python bench/report.py` from `bench/results/*.json`; how to run them: `bench/README.md`. The newest",
        "result of each benchmark (convergence: of each recipe); every older run stays in `bench/results/`",
        "(`python bench/report.py --all` renders them all).",
        "",
    ]
    rendered = 0
    for bench in sorted(by_bench, key=lambda b: ORDER.index(b) if b in ORDER else len(ORDER)):
        newest = {}  # the newest result per recipe (convergence: one per principle), else the newest
        for path, d in by_bench[bench]:
            newest.setdefault(d["settings"].get("recipe") if bench == "convergence" else None, (path, d))
        runs = by_bench[bench] if args.all else list(newest.values())
        rendered += len(runs)
        older = len(by_bench[bench]) - len(runs)
        lines += [f"## {bench}", ""] + (
            [f"({older} older results in `bench/results/{bench}-*.json`.)", ""] if older else []
        )
        for _, d in [] if args.no_plots else newest.values():
            png = plot(d)
            if png:
                lines += [f"![{bench}](plots/{png.name})", ""]
        if bench == "onnx_speed":
            lines += onnx_speed_over_runs(runs)
        for path, d in runs:
            lines += header(d, path) + SECTIONS.get(bench, lambda r: ["(unknown benchmark)"])(d["results"]) + [""]
            lines += [f"- note: {n}" for n in d.get("notes", [])] + [""]
    out = BENCH_DIR / "RESULTS.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out} ({rendered} of {len(files)} results)")


if __name__ == "__main__":
    main()
