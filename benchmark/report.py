"""Turns bench_out/results.json into docs/performance.md and docs/performance.png."""

import json
import sys
from pathlib import Path


def ms(value) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def runs(summary: dict) -> str:
    return " / ".join(f"{x:.0f}" for x in summary.get("runs_output_tokens_per_s", [summary["output_tokens_per_s"]]))


def best_hf(results: dict, key: str = "hf_W1") -> tuple[int, dict]:
    size = max(results[key], key=lambda s: results[key][s]["output_tokens_per_s"])
    return size, results[key][size]


def by_dtype(results: dict) -> dict[str, dict]:
    """dtype -> W1 fixed and varied, ours and transformers' best static batch, in the same dtype."""
    if "dtype" not in results:  # a saved run from before the dtype rows
        return {}
    rows = {}
    for dtype, prefix in ((results["dtype"], ""), (results["other_dtype"], f"{results['other_dtype']}_")):
        rows[dtype] = {"fixed": results[f"{prefix}W1"], "varied": results[f"{prefix}W1_varied"],
                       "hf_fixed": best_hf(results, f"hf_{prefix}W1"),
                       "hf_varied": best_hf(results, f"hf_{prefix}W1_varied")}
    return rows


def ratio(ours: dict, theirs: dict) -> float:
    return ours["output_tokens_per_s"] / theirs["output_tokens_per_s"]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = {int(k): v for k, v in results["sweep"].items()}
    hf = {int(k): v for k, v in results["hf_sweep"].items()}
    xs = sorted(sweep)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(xs, [sweep[x]["output_tokens_per_s"] for x in xs], "o-", label="lightvlm (concurrency)")
    left.plot(sorted(hf), [hf[x]["output_tokens_per_s"] for x in sorted(hf)], "s--",
              label="transformers (static batch)")
    left.set(xscale="log", xlabel="concurrent requests / batch size", ylabel="output tokens/s",
             title="Throughput")
    right.plot(xs, [sweep[x]["ttft_s"]["p50"] for x in xs], "o-", label="lightvlm p50")
    right.plot(xs, [sweep[x]["ttft_s"]["p99"] for x in xs], "o:", label="lightvlm p99")
    right.plot(sorted(hf), [hf[x]["ttft_p50_s"] for x in sorted(hf)], "s--",
               label="transformers p50 (64 requests in static batches)")
    right.set(xscale="log", xlabel="concurrent requests / batch size", ylabel="seconds", title="Time to first token")
    for axis in (left, right):
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle("small demo checkpoint, W1's requests: one 448x448 image, ~32 text tokens, 128 output tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def header(results: dict) -> list[str]:
    hf_size, hf_w1 = best_hf(results)
    return [
        "# Performance",
        "",
        "Measured by `make bench` (benchmark/run_all.py) in one run: lightvlm and the baselines on the same",
        "checkpoint and the same requests. Every number below is from that run; rerun it to check them.",
        "",
        f"- Machine: {results['machine']}.",
        "- Checkpoint: the `small` random-weight demo (about 27M parameters; InternViT with 448-pixel tiles and",
        f"  256 tokens per tile; a 6-layer Qwen2-style LLM). {results.get('dtype', 'fp32')} (the server's default on",
        "  this CPU) unless a row names another dtype; transformers runs in the same dtype as the row it is",
        "  compared with. Generation ignores EOS so every request produces exactly its output length.",
        f"- Server: `python {results['server_command']}` (defaults otherwise: the compute processes share",
        "  the cores among those busy at each step).",
        "- Load: `python -m benchmark.serve` (OpenAI chat API, streaming). Baseline: `python -m",
        "  benchmark.hf_baseline` (transformers `generate()`), ceiling: `python -m benchmark.engine_ceiling`.",
        f"- Whole run: {results['minutes']:.1f} minutes. W1 ran twice on each side (with other images the second "
        f"time) and the better run counts (lightvlm {runs(results['W1'])}, transformers batch {hf_size} "
        f"{runs(hf_w1)} tok/s): this machine is shared and the same run varies by several percent. W2",
        "  alternates request by request: each one through lightvlm, then the same one through transformers.",
    ]


def targets(results: dict) -> list[str]:
    w1, w2, w3 = results["W1"], results["W2"], results["W3"]
    hf_size, hf_w1 = best_hf(results)
    ceiling = {int(k): v for k, v in results["ceiling"].items()}[64]
    hf_w2 = results["hf_W2"]
    idle, loaded = results["W4_idle"], results["W4_loaded"]
    ratio_hf = w1["output_tokens_per_s"] / hf_w1["output_tokens_per_s"]
    ratio_ceiling = w1["output_tokens_per_s"] / ceiling["output_tokens_per_s"]
    hit_ratio = w3["ttft_hit_mean_s"] / w3["ttft_miss_mean_s"]
    probe_ratio = loaded["tpot_s"]["p99"] / idle["tpot_s"]["p99"]
    w2_met = w2["ttft_s"]["p50"] <= hf_w2["ttft_s"]["p50"] and w2["tpot_s"]["p50"] <= hf_w2["tpot_s"]["p50"]
    return [
        "## Targets",
        "",
        "| workload | target | measured | |",
        "|---|---|---|---|",
        *dtype_targets(results),
        f"| W1 throughput | >= 1.5x transformers' best static batch | {ratio_hf:.2f}x "
        f"({w1['output_tokens_per_s']:.0f} vs {hf_w1['output_tokens_per_s']:.0f} tok/s, batch {hf_size}) | "
        f"{verdict(ratio_hf >= 1.5)} |",
        f"| W1 throughput | >= 80% of the engine ceiling at batch 64 | {ratio_ceiling:.0%} "
        f"({w1['output_tokens_per_s']:.0f} vs {ceiling['output_tokens_per_s']:.0f} tok/s) | "
        f"{verdict(ratio_ceiling >= 0.8)} |",
        f"| W2 single stream | TTFT and TPOT no worse than transformers | TTFT {ms(w2['ttft_s']['p50'])} vs "
        f"{ms(hf_w2['ttft_s']['p50'])} ms, TPOT {w2['tpot_s']['p50'] * 1e3:.1f} vs "
        f"{hf_w2['tpot_s']['p50'] * 1e3:.1f} ms | "
        f"{verdict(w2_met)} |",
        f"| W3 repeated images | TTFT on a hit <= 0.5x a miss | {hit_ratio:.2f}x ({ms(w3['ttft_hit_mean_s'])} vs "
        f"{ms(w3['ttft_miss_mean_s'])} ms) | {verdict(hit_ratio <= 0.5)} |",
        f"| W4 interference | probes' p99 TPOT <= 2x idle | {probe_ratio:.2f}x ({ms(loaded['tpot_s']['p99'])} vs "
        f"{ms(idle['tpot_s']['p99'])} ms) | {verdict(probe_ratio <= 2)} |",
        *w5_targets(results),
        *video_target(results),
    ]


def dtype_targets(results: dict) -> list[str]:
    rows, lines = by_dtype(results), []
    for dtype, row in rows.items():
        for kind, bound in (("fixed", 1.2), ("varied", 1.5)):
            ours, (size, theirs) = row[kind], row[f"hf_{kind}"]
            lines.append(f"| W1 {kind} lengths, {dtype} | >= {bound}x transformers' best static batch, {dtype} | "
                         f"{ratio(ours, theirs):.2f}x ({ours['output_tokens_per_s']:.0f} vs "
                         f"{theirs['output_tokens_per_s']:.0f} tok/s, batch {size}) | "
                         f"{verdict(ratio(ours, theirs) >= bound)} |")
    if "bf16" in rows and "fp32" in rows:
        speedup = ratio(rows["bf16"]["fixed"], rows["fp32"]["fixed"])
        lines.append(f"| bf16 against fp32 (W1, lightvlm) | >= 2x on a CPU with AMX or AVX512-BF16 | {speedup:.2f}x "
                     f"({rows['bf16']['fixed']['output_tokens_per_s']:.0f} vs "
                     f"{rows['fp32']['fixed']['output_tokens_per_s']:.0f} tok/s) | {verdict(speedup >= 2)} |")
    return lines


def dtype_table(results: dict) -> list[str]:
    rows = by_dtype(results)
    if not rows:
        return []
    lines = ["## W1 by dtype, against transformers in the same dtype", "",
             f"The server's default is `--data_type auto`, which chose {results['dtype']} on this CPU; the "
             f"{results['other_dtype']} rows come from a second server started with `--data_type "
             f"{results['other_dtype']}`. W1 varied: output lengths uniform in 16-240 (mean 128), `ignore_eos`; "
             "transformers' static batch runs until its longest request ends and counts only the tokens each "
             "request asked for.", "",
             "| dtype | workload | lightvlm tok/s | transformers tok/s (best batch) | ratio | lightvlm TTFT p50 (ms) "
             "| transformers TTFT p50 (ms) |", "|---|---|---|---|---|---|---|"]
    for dtype, row in rows.items():
        for kind in ("fixed", "varied"):
            ours, (size, theirs) = row[kind], row[f"hf_{kind}"]
            lines.append(f"| {dtype} | W1 {kind} | {ours['output_tokens_per_s']:.0f} | "
                         f"{theirs['output_tokens_per_s']:.0f} (batch {size}) | {ratio(ours, theirs):.2f}x | "
                         f"{ms(ours['ttft_s']['p50'])} | {ms(theirs['ttft_s']['p50'])} |")
    return lines


def profile_section(results: dict) -> list[str]:
    if "profile" not in results:  # a saved run from before the profile
        return []
    lines = ["## Profile: where the time goes", ""]
    for dtype, prefix in ((results["dtype"], ""), (results["other_dtype"], f"{results['other_dtype']}_")):
        rooms = results[f"{prefix}W1"].get("room_cpu_s")
        if rooms:
            wall = results[f"{prefix}W1"]["duration_s"]
            busy = ", ".join(f"{name.removeprefix('lvlm-')} {sec:.1f}" for name, sec in
                             sorted(rooms.items(), key=lambda kv: -kv[1]) if sec >= 0.05)
            lines.append(f"- CPU seconds per room in one W1 run, {dtype} ({wall:.1f} s wall, "
                         f"{sum(rooms.values()) / wall:.2f} cores busy on average): {busy}.")
    lines += ["", "The language model alone, in-process on both sides (`python -m benchmark.profile`): "
              "48 text prompts of 300 tokens, 64 output tokens each, our runner against transformers' "
              "`generate()` as one static batch, torch.profiler self CPU time by operator class; \"Python, "
              "scheduling\" is the wall time no operator accounts for. The roof: the decoder's matmul FLOPs "
              "at the GEMM throughput this CPU measured at the model's shapes (prefill: 2048 rows; decode: 48 "
              "rows).", ""]
    for dtype, row in results["profile"].items():
        ours, theirs, roof = row["engine"], row["transformers"], row["roof"]
        classes = sorted(set(ours["seconds"]) | set(theirs["seconds"]), key=lambda c: -ours["seconds"].get(c, 0))
        lines += [f"**{dtype}**: roof {roof['roof_s']:.2f} s ({roof['prefill_gflop']:.0f} GFLOP prefill at "
                  f"{roof['gflops_prefill_shape']:.0f} GFLOPS, {roof['decode_gflop']:.0f} GFLOP decode at "
                  f"{roof['gflops_decode_shape']:.0f} GFLOPS); lightvlm {ours['wall_s']:.2f} s "
                  f"({roof['roof_s'] / ours['wall_s']:.0%} of the roof, {ours['output_tokens_per_s']:.0f} tok/s), "
                  f"transformers {theirs['wall_s']:.2f} s ({roof['roof_s'] / theirs['wall_s']:.0%}, "
                  f"{theirs['output_tokens_per_s']:.0f} tok/s).", "",
                  "| operator class | lightvlm (s) | share | transformers (s) | share |", "|---|---|---|---|---|"]
        for cls in classes:
            a, b = ours["seconds"].get(cls, 0.0), theirs["seconds"].get(cls, 0.0)
            lines.append(f"| {cls} | {a:.2f} | {a / ours['wall_s']:.0%} | {b:.2f} | {b / theirs['wall_s']:.0%} |")
        lines.append("")
    return lines[:-1]


def video_target(results: dict) -> list[str]:
    w6 = results.get("W6")
    if not w6 or w6.get("ttft_hit_s") is None or w6.get("ttft_miss_s") is None:
        return []
    ratio = w6["ttft_hit_s"] / w6["ttft_miss_s"]
    return [f"| W6 video, repeated clip | report | TTFT on a hit {ratio:.2f}x a miss ({ms(w6['ttft_hit_s'])} vs "
            f"{ms(w6['ttft_miss_s'])} ms); {w6['output_tokens_per_s']:.0f} output tok/s at c=4 | |"]


def w5_targets(results: dict) -> list[str]:
    w5, hf_w5 = results["W5"], results["hf_W5"]
    if "W5_nocache" not in results:  # a saved run from before the prefix cache
        return [f"| W5 multi-turn | report | {w5['requests_per_s']:.2f} vs {hf_w5['requests_per_s']:.2f} req/s | |"]
    ratio = w5["requests_per_s"] / hf_w5["requests_per_s"]
    later = w5["ttft_turn2plus_p50_s"] / results["W5_nocache"]["ttft_turn2plus_p50_s"]
    return [f"| W5 multi-turn | req/s >= 3x transformers' | {ratio:.2f}x ({w5['requests_per_s']:.2f} vs "
            f"{hf_w5['requests_per_s']:.2f} req/s) | {verdict(ratio >= 3)} |",
            f"| W5 multi-turn | turn-2+ TTFT p50 <= 0.3x the cache-off run | {later:.2f}x "
            f"({ms(w5['ttft_turn2plus_p50_s'])} vs {ms(results['W5_nocache']['ttft_turn2plus_p50_s'])} ms; "
            f"hit rate {w5['hit_rate']:.0%}) | {verdict(later <= 0.3)} |"]


def prefix_cache_table(results: dict) -> list[str]:
    if "W5_nocache" not in results:
        return []
    lines = ["## Prefix cache: W5 multi-turn and a shared system prompt", "",
             "W5: 16 sessions of 3 turns at concurrency 8, each turn sent after the previous answer with the whole "
             "history (turn 1 shows an image, turn 3 another); transformers gets the very requests the server saw, "
             "answers included, in static batches of 8, turn by turn. Shared system prompt: 32 questions behind one "
             "~800-token system prompt, concurrency 8 (transformers: static batches of 8). `benchmark/multi_turn.py`.",
             "", "| run | req/s | TTFT p50 (ms) | TTFT p50 by turn (ms) | cache hit rate (tokens) |",
             "|---|---|---|---|---|"]
    for key, label in (("W5", "W5, lightvlm"), ("W5_nocache", "W5, lightvlm --disable_dynamic_prompt_cache")):
        s = results[key]
        turns = " / ".join(ms(v) for _, v in sorted(s["ttft_by_turn_p50_s"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {label} | {s['requests_per_s']:.2f} | {ms(s['ttft_s']['p50'])} | {turns} | "
                     f"{s['hit_rate']:.0%} |")
    hf = results["hf_W5"]
    lines.append(f"| W5, transformers | {hf['requests_per_s']:.2f} | {ms(hf['ttft_s']['p50'])} | - | - |")
    for key, label in (("system_prompt", "system prompt, lightvlm"),
                       ("system_prompt_nocache", "system prompt, lightvlm --disable_dynamic_prompt_cache")):
        s = results[key]
        lines.append(f"| {label} | {s['requests_per_s']:.2f} | {ms(s['ttft_s']['p50'])} | - | {s['hit_rate']:.0%} |")
    hf = results["hf_system_prompt"]
    lines.append(f"| system prompt, transformers | {hf['requests_per_s']:.2f} | {ms(hf['ttft_s']['p50'])} | - | - |")
    return lines


def lightvlm_table(results: dict) -> list[str]:
    lines = ["## lightvlm, per workload", "",
             "| workload | req/s | output tok/s | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) "
             "| E2E p50 (ms) |", "|---|---|---|---|---|---|---|"]
    for name, label in (("W1", "W1 (c=64)"), ("W2", "W2 (c=1)"), ("W3", "W3 (c=4, half repeated)"),
                        ("W4_idle", "W4 probes, idle"), ("W4_loaded", "W4 probes, under image load"),
                        ("W6", "W6 video clips (c=4)")):
        if name not in results:
            continue
        s = results[name]
        lines.append(f"| {label} | {s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.0f} | "
                     f"{ms(s['ttft_s']['p50'])} / {ms(s['ttft_s']['p90'])} / {ms(s['ttft_s']['p99'])} | "
                     f"{ms(s['tpot_s']['p50'])} / {ms(s['tpot_s']['p99'])} | {ms(s['itl_s']['p50'])} / "
                     f"{ms(s['itl_s']['p99'])} | {ms(s['e2e_s']['p50'])} |")
    ceiling = {int(k): v for k, v in results["ceiling"].items()}[64]
    decode_rate = 64 / results["W1"]["tpot_s"]["p50"]
    lines += ["", f"W1's decode phase runs at about {decode_rate:.0f} tokens/s (64 / TPOT p50); the engine alone "
              f"decodes {ceiling['decode_tokens_per_s']:.0f} tokens/s at batch 64 with every core."]
    return lines


def baseline_tables(results: dict) -> list[str]:
    hf_w2, hf_w5 = results["hf_W2"], results["hf_W5"]
    lines = ["## transformers on the same requests", "",
             "| run | req/s | output tok/s | TTFT p50 (ms) | TPOT p50 (ms) |", "|---|---|---|---|---|"]
    for size, s in sorted(results["hf_W1"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| W1, static batch {size} | {s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.0f} | "
                     f"{ms(s['ttft_s']['p50'])} | {ms(s['tpot_s']['p50'])} |")
    lines.append(f"| W2, one at a time (alternating with lightvlm's) | - | {hf_w2['output_tokens_per_s']:.0f} | "
                 f"{ms(hf_w2['ttft_s']['p50'])} | {ms(hf_w2['tpot_s']['p50'])} |")
    lines.append(f"| W5, static batch 8, turn by turn | {hf_w5['requests_per_s']:.2f} | "
                 f"{hf_w5['output_tokens_per_s']:.0f} | {ms(hf_w5['ttft_s']['p50'])} | {ms(hf_w5['tpot_s']['p50'])} |")
    lines += ["", "## Engine ceiling (model runner alone, 300-token prompts, 128 output tokens, all cores)", "",
              "| batch | decode step (ms) | decode tok/s | output tok/s incl. prefill |", "|---|---|---|---|"]
    for size, row in sorted(results["ceiling"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {size} | {row['decode_step_ms']:.1f} | {row['decode_tokens_per_s']:.0f} | "
                     f"{row['output_tokens_per_s']:.0f} |")
    return lines


def structured_table(results: dict) -> list[str]:
    if "structured" not in results:  # a saved run from before structured outputs
        return []
    lines = ["## Structured outputs: JSON schema against unconstrained (model runner alone)", "",
             "Each request decodes 64 tokens under a JSON schema that cannot end early (an array of objects "
             "with integer, string, enum and boolean fields), or unconstrained; the fastest of three alternating "
             "runs of each. `python -m benchmark.structured_cost --model_dir DIR` (add `--mask_tokenizer DIR` "
             "for the masks alone at a real vocabulary size).", "",
             "| batch | vocab | unconstrained (µs/token) | JSON schema (µs/token) | overhead (µs/token) | "
             "mask fill (ms/step) |", "|---|---|---|---|---|---|"]
    for size, row in sorted(results["structured"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {size} | {row['vocab']} | {row['unconstrained']['us_per_token']:.0f} | "
                     f"{row['json_schema']['us_per_token']:.0f} | {row['overhead_us_per_token']:.0f} "
                     f"({row['overhead_pct']:+.0f}%) | {row['json_schema']['mask_fill_ms_per_step']:.2f} |")
    return lines


def sweep_table(results: dict) -> list[str]:
    lines = ["## Throughput and TTFT against concurrency", "", "![throughput and TTFT](performance.png)", "",
             "| concurrency | requests | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) |", "|---|---|---|---|---|"]
    for concurrency, s in sorted(results["sweep"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {concurrency} | {s['requests']} | {s['output_tokens_per_s']:.0f} | "
                     f"{ms(s['ttft_s']['p50'])} | {ms(s['ttft_s']['p99'])} |")
    return lines


def write_report(results: dict, markdown: Path, png: Path, analysis: Path) -> None:
    plot(results, png)
    sections = [header(results), targets(results), dtype_table(results), profile_section(results),
                lightvlm_table(results), prefix_cache_table(results), baseline_tables(results),
                structured_table(results), sweep_table(results)]
    if analysis.exists():
        sections.append([analysis.read_text().strip()])
    markdown.write_text("\n\n".join("\n".join(section) for section in sections if section) + "\n")


if __name__ == "__main__":  # rebuild the report from a saved run: python -m benchmark.report bench_out/results.json
    here = Path(__file__).resolve().parents[1]
    write_report(json.loads(Path(sys.argv[1]).read_text()), here / "docs" / "performance.md",
                 here / "docs" / "performance.png", Path(__file__).with_name("analysis.md"))
