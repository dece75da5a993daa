"""Markdown tables of a benchmark result (the JSON of ``mindeye_dist.benchmark.run_benchmark``)."""

from __future__ import annotations

from typing import Any, Optional


def _f(v: Optional[float], fmt: str = "{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def _gib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def _met(m: Optional[bool]) -> str:
    return "n/a" if m is None else ("met" if m else "**missed**")


def format_markdown(r: dict[str, Any]) -> str:
    out = [f"**Device:** {r['device']}  ", f"**Date:** {r['date']}  ", f"**Command:** `{r.get('command') or '-'}`  ",
           f"**Precision:** {r['precision']}; torch threads {r['host'].get('torch_threads')}; "
           f"host allocator {r.get('host_memory', 'unchanged')}; "
           f"load average at start {_f((r['host'].get('load_avg_at_start') or [None])[0], '{:.2f}')}, "
           f"at end {_f((r['host'].get('load_avg_at_end') or [None])[0], '{:.2f}')}; run took {r['duration_s']:.0f} s", ""]
    if r.get("load_warning"):
        out += [f"> **Load warning:** {r['load_warning']}.", ""]
    out += ["### Headline ratios", "", "| ratio | value | target | status | basis |", "|---|---|---|---|---|"]
    for k, t in r["targets"].items():
        out.append(f"| `{k}` | {_f(t['value'], '{:.3g}')} | {t['target']} | {_met(t['met'])} | {t['note']} |")
    out.append("")
    peak = r.get("peak")
    if peak:
        out += [f"Matmul peak ({peak['dtype']}, {peak['n']}x{peak['n']}, {peak['threads']} threads): "
                f"{_f(peak.get('matmul_flops_per_s_before'), '{:.4g}')} FLOP/s before training, "
                f"{_f(peak.get('matmul_flops_per_s_after'), '{:.4g}')} after; fractions use the higher. "
                f"Datasheet peak: {_f(peak.get('datasheet_flops_per_s'), '{:.4g}')}. Memory bandwidth (fp32 copy, read + "
                f"write): {_f((peak.get('copy_bandwidth_bytes_per_s') or 0) / 1e9 or None, '{:.1f}')} GB/s.", ""]
    train = r.get("train")
    if train:
        out += ["### Training step (synthetic in-memory batches)", "",
                "| preset | params | GFLOP/sample | micro-batch | step ms (median) | samples/s | GFLOP/s | "
                "of matmul peak | fwd+loss / bwd / opt ms | data-wait share |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for name, p in train["presets"].items():
            label = name if p["preset"] == name else f"{name} -> {p['preset']}"
            for row in p["rows"]:
                ph = row["phase_s"]
                out.append(f"| {label} | {p['params'] / 1e6:.1f}M | {p['flops_per_sample'] / 1e9:.3g} | {row['micro_batch']} | "
                           f"{row['step_time_s'] * 1e3:.1f} | {row['samples_per_s']:.1f} | {row['flops_per_s'] / 1e9:.1f} | "
                           f"{_f(row['fraction_of_peak'], '{:.2f}')} | {ph['forward_loss'] * 1e3:.0f} / "
                           f"{ph['backward'] * 1e3:.0f} / {ph['optimizer_step'] * 1e3:.0f} | {row['data_wait_share']:.2f} |")
        first = next(iter(train["presets"].values()))
        out += ["", f"Engine: {first['engine']}; ds config `{first['ds_config']}`; median of up to "
                f"{r['options']['repeats']} timed steps after {r['options']['warmup']} warm-up step(s).", ""]
        for name, p in train["presets"].items():
            rl = p.get("real_loader")
            if rl:
                out += [f"Real loader ({name}, local shards, {rl['num_workers']} worker(s), micro-batch {rl['micro_batch']}, "
                        f"{rl['steps']} steps): {rl['samples_per_s']:.1f} samples/s, data-wait share "
                        f"**{rl['data_wait_share']:.3f}** ({rl['data_wait_s'] * 1e3:.1f} ms of {rl['step_time_s'] * 1e3:.1f} ms/step).", ""]
        for name, p in train["presets"].items():
            prof = p.get("profile")
            if prof:
                out += [f"### Where the time goes: {p['preset']}, micro-batch {prof['micro_batch']} (torch.profiler, one step, "
                        f"{prof['wall_s']:.2f} s under the profiler)", "", "| category | ms | share |", "|---|---|---|"]
                out += [f"| {k} | {v['ms']:.0f} | {v['share']:.2f} |" for k, v in prof["categories"].items()]
                out += ["", "| top op (self time) | ms | calls | share |", "|---|---|---|---|"]
                out += [f"| `{o['op']}` | {o['self_ms']:.0f} | {o['calls']} | {o['share']:.2f} |" for o in prof["top_ops"]]
                out.append("")
            var = p.get("variants")
            if var:
                out += [f"### Shipped speed-ups, each turned off ({p['preset']}, micro-batch {var['micro_batch']}, "
                        f"interleaved runs)", "",
                        "| variant | step ms | samples/s | of matmul peak | speed-up |", "|---|---|---|---|---|"]
                for label, row in var["rows"].items():
                    out.append(f"| {label} | {row['step_time_s'] * 1e3:.0f} | {row['samples_per_s']:.2f} | "
                               f"{_f(row['fraction_of_peak'], '{:.2f}')} | {row['speedup_vs_shipped']:.2f}x |")
                out += [""] + [f"- `{k}`: {v}" for k, v in var["descriptions"].items()] + [""]
        if train.get("substitutions"):
            for k, v in train["substitutions"].items():
                out += [f"Note: `{k}` needed {_gib(v['needed_bytes'])} GiB but {_gib(v['mem_available_bytes'])} GiB were "
                        f"available; measured `{v['used']}` instead.", ""]
    ref = r.get("reference")
    if ref:
        enc = ref["encoder"]
        out += ["### Reference-style loop (frozen encoder on every batch, plain AdamW)", "",
                "| preset | micro-batch | steps | step s (median) | encoder s | train step s | samples/s |",
                "|---|---|---|---|---|---|---|",
                f"| {ref['preset']} | {ref['micro_batch']} | {ref['timed_steps']} | {ref['step_time_s']:.2f} | "
                f"{enc['seconds_per_step']:.2f} | {ref['train_step_s']:.3f} | {ref['samples_per_s']:.3f} |", "",
                f"Encoder: open_clip `{enc['name']}` random init ({enc['params'] / 1e6:.0f}M vision params, "
                f"{enc['image_size']}px, {enc['tokens_shape'][0]}x{enc['tokens_shape'][1]} tokens), fp32 eager, no_grad; "
                f"{ref['targets']}; {ref['optimizer']}.", ""]
    me1 = r.get("mindeye1")
    if me1:
        out += format_mindeye1(me1)
    data = r.get("data")
    if data:
        dd = data.get("dims", {})
        out += [f"### Data loader ({dd.get('n_voxels')}x3 voxels + {dd.get('n_tokens')}x{dd.get('token_dim')} targets "
                f"per sample, float16)", "",
                "| source | samples/s | MB/s | loader CPU s/GB | server CPU s/GB |", "|---|---|---|---|---|"]
        for src in ("local", "s3"):
            d = data[src]
            out.append(f"| {src} | {d['samples_per_s']:.0f} | {d['mb_per_s']:.0f} | {_f(d.get('client_cpu_s_per_gb'), '{:.2f}')} | "
                       f"{_f(d.get('server_cpu_s_per_gb'), '{:.2f}') if src == 's3' else '-'} |")
        out += ["", f"{data['train_samples']} train samples in {data['train_shards']} shards, "
                f"{data['bytes_per_sample'] / 1e3:.0f} KB/sample, {data['num_workers']} workers, batch {data['batch_size']}, "
                f"median of {data['repeats']} epoch(s); S3 = {data.get('s3_server', 'moto')} server on 127.0.0.1, "
                f"shards read by {data.get('s3_reader', 's3fs')} (listing and metadata through s3fs).", ""]
    mem = r.get("memory")
    if mem:
        by = mem.get("by_precision") or {mem["precision"]: {"stages": mem["stages"]}}
        out += [f"### ZeRO model-state memory per rank, 2 ranks, {mem['preset']} ({mem['params'] / 1e6:.0f}M params, "
                f"largest layer {mem['largest_layer_params'] / 1e6:.1f}M)", "",
                "| precision | stage | measured GiB/rank | untrimmed RSS | live tensors | estimate | estimate/measured | "
                "step peak | estimated peak | DeepSpeed estimator | ZeRO-3/ZeRO-0 measured (estimate) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for prec, entry in by.items():
            ratio = entry.get("zero3_vs_zero0")
            ratio_txt = "" if ratio is None else f"{ratio:.3f} ({_f(entry.get('zero3_vs_zero0_estimate'), '{:.3f}')})"
            for i, (k, s) in enumerate(entry["stages"].items()):
                out.append(f"| {prec} | ZeRO-{k} | {_gib(s['measured_model_state_bytes_per_rank'])} | "
                           f"{_gib(s.get('untrimmed_model_state_bytes_per_rank'))} | {_gib(s.get('live_tensor_bytes_per_rank'))} | "
                           f"{_gib(s['estimate_model_state_bytes_per_rank'])} | {_f(s['estimate_vs_measured'], '{:.2f}')} | "
                           f"{_gib(s.get('step_peak_bytes_per_rank'))} | {_gib(s.get('estimate_peak_bytes_per_rank'))} | "
                           f"{_gib(s['deepspeed_estimate_bytes'])} | {ratio_txt if i == 0 else ''} |")
        out += ["", "Measured = RSS after `malloc_trim` with parameters, gradients, optimizer states and DeepSpeed's "
                "persistent buffers all alive (after the backward of a second step) - the same before the model was "
                "built, max over ranks; untrimmed = the same without `malloc_trim` (glibc's free heap chunks count); "
                "live tensors = bytes of every live CPU tensor storage (`torch.empty` buffers in full); step peak = "
                "peak RSS during the second step (forward, backward, optimizer step) - baseline, against the estimate's "
                "`peak_bytes` (states + transient buffers + activations). Under `train.host_memory=reuse` (the CPU "
                "default) a run's RSS stays at the step peak. `+small_buckets`: the shipped config with every bucket at "
                "5e6 elements.", ""]
    return "\n".join(out)


def format_mindeye1(m: dict[str, Any]) -> list[str]:
    """The MindEye1-size comparison: throughput, memory, where each side's step goes."""
    sh, sps, st, mem = m["shape"], m["samples_per_s"], m["step_s"], m["memory"]
    loads = ", ".join(f"{x:.1f}" for x in m.get("load_avg_1m", []))
    out = [f"### Reference comparison at MindEye1 size (hidden {m['hidden']}, micro-batch {m['micro_batch']}, fp32)", "",
           f"{sh['n_voxels']:,} voxels -> {sh['n_blocks']} blocks of {m['hidden']} -> {sh['n_tokens']}x{sh['token_dim']} "
           f"tokens, projector {sh['projector_hidden']}, prior depth {sh['prior_depth']} over {2 * sh['n_tokens'] + 1} "
           f"tokens; {m['params']['ours']:,} trainable parameters (reference {m['params']['reference']:,}); "
           f"{m['flops_per_sample'] / 1e9:.3g} GFLOP/sample. {m['rounds']} alternating round(s) per side, each in its "
           f"own process; 1-minute load average before/after each process: {loads}.", "",
           "| side | step s (median) | samples/s | ours is | peak RSS GiB |", "|---|---|---|---|---|",
           f"| **ours** ({m['engine']}) | {st['ours']:.2f} | {sps['ours']:.3g} | - | {_gib(mem['ours_peak_rss_bytes'])} "
           f"(estimate {_gib(mem['ours_estimate_peak_bytes'])}) |",
           f"| reference, frozen {m['encoder']['name']} every step | {st['reference_with_encoder']:.2f} "
           f"(encoder {st['reference_encoder']:.2f}) | {sps['reference_with_encoder']:.3g} | "
           f"**{m['ratio_vs_reference_with_encoder']:.2f}x** | {_gib(mem['reference_peak_rss_bytes'])} |",
           f"| reference, cached targets | {st['reference_cached_targets']:.2f} | {sps['reference_cached_targets']:.3g} | "
           f"**{m['ratio_vs_reference_cached_targets']:.2f}x** | {_gib(mem['reference_peak_rss_without_encoder_weights_bytes'])} "
           f"(without the encoder's weights) |", "",
           f"Ours: {m['flops_per_s_ours'] / 1e9:.1f} GFLOP/s; phases forward+loss / backward / optimizer "
           f"{m['phases_s']['forward_loss']:.2f} / {m['phases_s']['backward']:.2f} / {m['phases_s']['optimizer_step']:.2f} s; "
           f"host allocator {mem['host_memory']}. Training FLOPs per sample by component: "
           + ", ".join(f"{k} {v / 1e9:.3g} G" for k, v in m["flops_by_component"].items() if v and k != "total") + ".", ""]
    comp = m.get("components_s") or {}
    if comp.get("ours") and comp.get("reference"):
        out += ["Each component alone, forward + backward (the optimizer: one step), seconds at this micro-batch:", "",
                "| component | ours | reference |", "|---|---|---|"]
        for k, v in comp["ours"].items():
            out.append(f"| {k.strip()}{' (part of the backbone)' if k.startswith(' ') else ''} | {v:.2f} | "
                       f"{_f(comp['reference'].get(k), '{:.2f}')} |")
        out.append("")
    for side, prof in (m.get("profile") or {}).items():
        if not prof:
            continue
        out += [f"Profile of one step, {side.replace('_', ' ')} (torch.profiler, {prof['wall_s']:.1f} s): "
                + ", ".join(f"{k} {v['share']:.2f}" for k, v in prof["categories"].items()) + "; top ops: "
                + ", ".join(f"`{o['op']}` {o['share']:.2f}" for o in prof["top_ops"][:6]) + ".", ""]
    return out
