//! BENCHMARKS.md from a results directory: both servers' runs of every
//! workload side by side, the ratios against the aims, the roofline, the
//! quality parity and the plots.
//!
//! The directory (what `scripts/bench.sh` fills):
//! `meta.json` (date, machine, versions, command lines), `<label>/<wN>.json`
//! for the labels `strata`, `llama-server` and `strata-tiers` (w7 with the
//! tiers on), `roofline.json`, `quality.json`, and `analysis.md` (prose
//! included as it is).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::quality::Parity;
use crate::report::{PhaseResult, RunResult, markdown};
use crate::roofline::Roofline;

/// The Strata label, the peer's, and Strata with its tiers on (w7).
pub const STRATA: &str = "strata";
/// The peer's label.
pub const PEER: &str = "llama-server";
/// Strata with host and SSD tiers on (w7).
pub const STRATA_TIERS: &str = "strata-tiers";

/// The roofline as a Markdown table.
pub fn roofline_table(r: &Roofline) -> String {
    let mut s = format!(
        "Weights read per token: {:.1} MiB; KV per token of context: {} bytes; matmul MACs per token through the layers: {:.3} G (the output head's {:.3} G more for each row that samples).\n\n",
        r.weight_bytes as f64 / 1_048_576.0,
        r.kv_bytes_per_token,
        r.macs_per_token as f64 / 1e9,
        r.output_macs as f64 / 1e9
    );
    s.push_str("| threads | read GB/s (1 GiB; weights-sized) | int8 kernel peak GMAC/s | decode depth 0 tok/s (GB/s, of bandwidth; of weights-sized) | decode depth 1,536 tok/s (GB/s, of bandwidth; of weights-sized) | prefill pp512 tok/s (GMAC/s, of peak) |\n|---|---|---|---|---|---|\n");
    for roof in &r.roofs {
        let d = |i: usize| {
            roof.decode.get(i).map_or_else(String::new, |d| {
                format!(
                    "{:.1} ({:.1}, {:.0}%; {:.0}%)",
                    d.tok_s,
                    d.gb_s,
                    d.fraction * 100.0,
                    d.fraction_weights_sized * 100.0
                )
            })
        };
        let _ = writeln!(
            s,
            "| {} | {:.1}; {:.1} | {:.1} | {} | {} | {:.1} ({:.1}, {:.0}%) |",
            roof.threads,
            roof.read_gb_s,
            roof.read_weights_sized_gb_s,
            roof.kernel_gmac_s,
            d(0),
            d(1),
            roof.prefill_tok_s,
            roof.prefill_gmac_s,
            roof.prefill_fraction * 100.0
        );
    }
    s
}

/// The quality parity as a Markdown table.
pub fn parity_table(p: &Parity) -> String {
    let mut s = String::from("| figure | value |\n|---|---|\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(s, "| {k} | {v} |");
    };
    row(
        "positions compared (second half of each chunk)",
        format!("{} ({} chunks of {})", p.positions, p.chunks, p.n_ctx),
    );
    row(
        "perplexity, Strata (`/v1/completions`, `echo`, `logprobs`)",
        format!("{:.4}", p.ppl_strata),
    );
    if let Some(r) = p.ppl_llama_reported {
        row(
            "perplexity, llama.cpp (`llama-perplexity`)",
            format!("{r:.4}"),
        );
    }
    row(
        "perplexity, llama.cpp (from its saved log-probabilities)",
        format!("{:.4}", p.ppl_llama_file),
    );
    row(
        "Strata's perplexity relative to llama.cpp's",
        format!("{:+.2}%", p.ppl_relative_diff * 100.0),
    );
    row(
        "teacher-forced top-1 agreement",
        format!("{:.2}%", p.top1_agreement * 100.0),
    );
    row(
        "mean abs. difference of the top-1 log-probability (where they agree)",
        format!("{:.4} nats", p.mean_abs_top1_logprob_diff),
    );
    row(
        "mean abs. difference of the next token's log-probability",
        format!("{:.4} nats", p.mean_abs_token_logprob_diff),
    );
    row(
        "largest such difference",
        format!("{:.3} nats", p.max_abs_token_logprob_diff),
    );
    row(
        "positions left out: llama.cpp's value clamped / Strata's top-1 a partial byte",
        format!("{} / {}", p.clamped_positions, p.ambiguous_top1),
    );
    if let Some(r) = &p.reference {
        let _ = writeln!(
            s,
            "\nAgainst the f32 reference (the same weights; activations never quantized; matmuls and attention accumulated in f64; K and V unrounded), over the first {} scored positions:\n\n| | Strata | llama.cpp |\n|---|---|---|\n| perplexity (reference: {:.4}) | {:.4} | {:.4} |\n| top-1 agreement with the reference | {:.2}% | {:.2}% |\n| mean abs. difference of the next token's log-probability | {:.4} nats | {:.4} nats |",
            r.positions,
            r.ppl_reference,
            r.ppl_strata,
            r.ppl_llama,
            r.strata_top1 * 100.0,
            r.llama_top1 * 100.0,
            r.strata_mean_abs,
            r.llama_mean_abs
        );
    }
    s
}

fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn run(dir: &Path, label: &str, workload: &str) -> Option<RunResult> {
    load(&dir.join(label).join(format!("{workload}.json")))
}

fn phase<'a>(r: &'a Option<RunResult>, name: &str) -> Option<&'a PhaseResult> {
    r.as_ref()?.phases.iter().find(|p| p.name == name)
}

fn later_mean(p: &PhaseResult) -> Option<f64> {
    p.ttft_by_tag_ms.get("later").map(|d| d.mean)
}

/// The highest rate of a sweep whose phase was sustained
/// ([`PhaseResult::sustained`] within `bound_ms`), and whether the sweep
/// reached a rate that was not (else the server may sustain more than was
/// tried).
pub fn sustainable_rate(r: &RunResult, bound_ms: f64) -> (Option<f64>, bool) {
    let mut best = None;
    let mut passed = false;
    for p in &r.phases {
        match (p.sustained(bound_ms), p.rate) {
            (true, Some(rate)) if !passed => best = Some(best.map_or(rate, |b: f64| b.max(rate))),
            (false, _) => passed = true,
            _ => {}
        }
    }
    (best, passed)
}

/// One aim: what is compared, Strata's figure, the peer's, the ratio, the
/// aim, and whether it is met.
struct Aim {
    what: String,
    strata: String,
    peer: String,
    ratio: f64,
    aim: String,
    met: bool,
    /// Neither side had a failure or an unsent request in the phases
    /// compared (else the figures do not compare like with like).
    clean: bool,
}

fn aims(dir: &Path) -> Vec<Aim> {
    let mut out = Vec::new();
    let (s1, l1) = (run(dir, STRATA, "w1"), run(dir, PEER, "w1"));
    for n in ["prompt 16", "prompt 512", "prompt 1536"] {
        if let (Some(a), Some(b)) = (phase(&s1, n), phase(&l1, n)) {
            let r = a.decode_tok_s.p50 / b.decode_tok_s.p50;
            out.push(Aim {
                what: format!("w1 decode tok/s, {n}"),
                strata: format!("{:.1}", a.decode_tok_s.p50),
                peer: format!("{:.1}", b.decode_tok_s.p50),
                ratio: r,
                aim: ">= 1.3x".into(),
                met: r >= 1.3,
                clean: a.clean() && b.clean(),
            });
        }
    }
    let (s2, l2) = (run(dir, STRATA, "w2"), run(dir, PEER, "w2"));
    for c in [4, 8, 16, 32] {
        let n = format!("clients {c}");
        if let (Some(a), Some(b)) = (phase(&s2, &n), phase(&l2, &n)) {
            let r = a.output_tok_s / b.output_tok_s;
            out.push(Aim {
                what: format!("w2 output tok/s, {n}"),
                strata: format!("{:.1}", a.output_tok_s),
                peer: format!("{:.1}", b.output_tok_s),
                ratio: r,
                aim: ">= 2x".into(),
                met: r >= 2.0,
                clean: a.clean() && b.clean(),
            });
        }
    }
    let (s3, l3) = (run(dir, STRATA, "w3"), run(dir, PEER, "w3"));
    for c in [4, 16] {
        let n = format!("clients {c}");
        if let (Some(a), Some(b)) = (phase(&s3, &n), phase(&l3, &n)) {
            let r = a.ttft_ms.mean / b.ttft_ms.mean;
            out.push(Aim {
                what: format!("w3 mean TTFT ms, {n}"),
                strata: format!("{:.0}", a.ttft_ms.mean),
                peer: format!("{:.0}", b.ttft_ms.mean),
                ratio: r,
                aim: "<= 1/4".into(),
                met: r <= 0.25,
                clean: a.clean() && b.clean(),
            });
        }
    }
    let later = |wl: &str, label: &str, names: &[&str], out: &mut Vec<Aim>| {
        let (s, l) = (run(dir, STRATA, wl), run(dir, PEER, wl));
        let names: Vec<String> = if names.is_empty() {
            s.as_ref()
                .map(|r| r.phases.iter().map(|p| p.name.clone()).collect())
                .unwrap_or_default()
        } else {
            names.iter().map(|n| n.to_string()).collect()
        };
        for n in names {
            let (pa, pb) = (phase(&s, &n), phase(&l, &n));
            if let (Some(a), Some(b)) = (pa.and_then(later_mean), pb.and_then(later_mean)) {
                let r = a / b;
                let clean =
                    pa.is_some_and(PhaseResult::clean) && pb.is_some_and(PhaseResult::clean);
                out.push(Aim {
                    what: format!("{wl} mean TTFT ms after the first {label}, {n}"),
                    strata: format!("{a:.0}"),
                    peer: format!("{b:.0}"),
                    ratio: r,
                    aim: "<= 1/2".into(),
                    met: r <= 0.5,
                    clean,
                });
            }
        }
    };
    later("w4", "turn", &[], &mut out);
    later("w5", "question", &["sequential", "concurrent"], &mut out);
    // w6: the cold question, and the median over the questions asked each
    // as the first request after its own restart.
    let w6 = |label: &str| -> Option<(f64, f64, bool)> {
        let cold = run(dir, label, "w6-cold")?;
        let restart = run(dir, label, "w6-restart")?;
        let c = cold.phases.first()?;
        let ttfts: Vec<f64> = restart.phases.iter().map(|p| p.ttft_ms.p50).collect();
        let clean = c.clean() && restart.phases.iter().all(PhaseResult::clean);
        (!ttfts.is_empty()).then(|| (c.ttft_ms.p50, crate::stats::median(&ttfts), clean))
    };
    if let Some((c, r, clean)) = w6(STRATA) {
        let peer = w6(PEER).map_or_else(|| "-".into(), |(a, b, _)| format!("{a:.0} -> {b:.0}"));
        let ratio = r / c;
        out.push(Aim {
            what: "w6 TTFT ms, cold -> first request after a restart (Strata's own ratio)".into(),
            strata: format!("{c:.0} -> {r:.0}"),
            peer,
            ratio,
            aim: "<= 1/20 of cold".into(),
            met: ratio <= 0.05,
            clean,
        });
    }
    if let (Some(a), Some(b)) = (run(dir, STRATA, "w8"), run(dir, PEER, "w8")) {
        let (ra, pa) = sustainable_rate(&a, 10_000.0);
        let (rb, pb) = sustainable_rate(&b, 10_000.0);
        let show = |r: Option<f64>, passed: bool| match r {
            Some(r) if passed => format!("{r}/s"),
            Some(r) => format!(">= {r}/s (the highest tried)"),
            None => "below the lowest tried".into(),
        };
        // A rate a sweep never failed at is a lower bound: "met" needs the
        // peer's limit found, "behind" needs Strata's.
        let (ratio, met, clean) = match (ra, rb) {
            (Some(a), Some(b)) => {
                let r = a / b;
                (r, r >= 2.0 && pb, if r >= 2.0 { pb } else { pa })
            }
            (Some(_), None) => (f64::INFINITY, pb, pb),
            (None, Some(_)) => (0.0, false, pa),
            (None, None) => (f64::NAN, false, false),
        };
        out.push(Aim {
            what: "w8 sustainable request rate (TTFT p99 <= 10 s, no growing queue)".into(),
            strata: show(ra, pa),
            peer: show(rb, pb),
            ratio,
            aim: ">= 2x".into(),
            met,
            clean,
        });
    }
    if let Some(r) = load::<Roofline>(&dir.join("roofline.json")) {
        for roof in &r.roofs {
            if let Some(d) = roof.decode.first() {
                out.push(Aim {
                    what: format!(
                        "decode at depth 0, fraction of read bandwidth, {} thread(s)",
                        roof.threads
                    ),
                    strata: format!("{:.1} GB/s of {:.1}", d.gb_s, roof.read_gb_s),
                    peer: "-".into(),
                    ratio: d.fraction,
                    aim: ">= 60%".into(),
                    met: d.fraction >= 0.6,
                    clean: true,
                });
            }
        }
    }
    if let Some(p) = load::<Parity>(&dir.join("quality.json")) {
        let ppl = p.ppl_llama_reported.unwrap_or(p.ppl_llama_file);
        out.push(Aim {
            what: "perplexity, Strata / llama.cpp".into(),
            strata: format!("{:.4}", p.ppl_strata),
            peer: format!("{ppl:.4}"),
            ratio: p.ppl_strata / ppl,
            aim: "within 1%".into(),
            met: p.ppl_relative_diff.abs() <= 0.01,
            clean: true,
        });
        out.push(Aim {
            what: "teacher-forced top-1 agreement".into(),
            strata: format!("{:.2}%", p.top1_agreement * 100.0),
            peer: "-".into(),
            ratio: p.top1_agreement,
            aim: ">= 98%".into(),
            met: p.top1_agreement >= 0.98,
            clean: true,
        });
    }
    out
}

fn meta_line(meta: &Value, key: &str) -> String {
    match meta.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "-".into(),
    }
}

/// Writes the report and its plots.
pub fn write_report(dir: &Path, out: &Path, plots: &Path) -> Result<()> {
    std::fs::create_dir_all(plots).with_context(|| format!("creating {}", plots.display()))?;
    let meta: Value = load(&dir.join("meta.json")).unwrap_or(Value::Null);
    let mut s = String::from("# Benchmarks\n\n");
    s.push_str("Strata against llama.cpp's `llama-server` on one machine, in one run, workloads alternating between the servers. Every figure below is measured by the command that follows; nothing is typed in by hand.\n\n");
    s.push_str("```sh\nbash scripts/bench.sh            # builds both servers (the peer once, with progress), runs everything, rewrites this file\n```\n\n");
    s.push_str("The load client (`strata bench`) runs on the same machine, and so on the same cores, as the server it measures: both servers pay that alike. Each workload starts its server fresh (no cache carried over); which server goes first alternates from workload to workload for w1-w5 and w8 (w6 and w7 run Strata first; see below for this run). Open-loop latencies (w8) count from each request's planned arrival. Where a request failed or went unsent, the aim that uses it says \"not comparable\".\n\n");
    for (k, what) in [
        ("date", "Date"),
        ("machine", "Machine"),
        ("strata", "Strata"),
        ("llama", "llama.cpp"),
        ("model", "Model"),
        ("threads", "Threads (both servers)"),
    ] {
        let _ = writeln!(s, "- {what}: {}", meta_line(&meta, k));
    }
    if let Some(Value::Object(cmds)) = meta.get("commands") {
        s.push_str("\nThe servers' command lines (per workload, `-np` and `-c` follow the client count):\n\n");
        for (k, v) in cmds {
            let _ = writeln!(s, "- {k}: `{}`", v.as_str().unwrap_or(""));
        }
    }
    s.push_str("\n## Against the aims\n\n| figure | Strata | llama.cpp | ratio | aim | |\n|---|---|---|---|---|---|\n");
    let aims = aims(dir);
    for a in &aims {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {} | {} |",
            a.what,
            a.strata,
            a.peer,
            a.ratio,
            a.aim,
            match (a.clean, a.met) {
                (false, _) =>
                    "not comparable: a request failed or went unsent, or a sweep did not reach a limit",
                (true, true) => "met",
                (true, false) => "**behind**",
            }
        );
    }
    let behind: Vec<&Aim> = aims.iter().filter(|a| a.clean && !a.met).collect();
    if !behind.is_empty() {
        s.push_str("\nWhere Strata is behind its aims: ");
        s.push_str(
            &behind
                .iter()
                .map(|a| a.what.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        );
        s.push_str(".\n");
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("analysis.md")) {
        s.push('\n');
        s.push_str(&text);
        if !text.ends_with('\n') {
            s.push('\n');
        }
    }
    // Plots.
    let rel = |name: &str| -> String {
        let p = plots.join(name);
        let base = out.parent().unwrap_or(Path::new(""));
        p.strip_prefix(base).unwrap_or(&p).display().to_string()
    };
    s.push_str("\n## Plots\n\n");
    let mut cats = Vec::new();
    let (mut ts, mut tl) = (Vec::new(), Vec::new());
    for wl in ["w1", "w2", "w3", "w5"] {
        let (a, b) = (run(dir, STRATA, wl), run(dir, PEER, wl));
        if let Some(ra) = &a {
            for p in &ra.phases {
                cats.push(format!(
                    "{wl} {}",
                    p.name.replace("clients ", "c").replace("prompt ", "p")
                ));
                ts.push(p.ttft_ms.p50);
                tl.push(phase(&b, &p.name).map_or(f64::NAN, |q| q.ttft_ms.p50));
            }
        }
    }
    if !cats.is_empty() {
        crate::plot::bars(
            &plots.join("ttft.svg"),
            "TTFT p50 per workload (ms, lower is better)",
            "ms",
            &cats,
            &[(STRATA.into(), ts), (PEER.into(), tl)],
        )?;
        let _ = writeln!(s, "![TTFT per workload]({})\n", rel("ttft.svg"));
    }
    let (a, b) = (run(dir, STRATA, "w2"), run(dir, PEER, "w2"));
    let pts = |r: &Option<RunResult>| -> Vec<(f64, f64)> {
        r.as_ref().map_or_else(Vec::new, |r| {
            r.phases
                .iter()
                .filter_map(|p| {
                    p.name
                        .strip_prefix("clients ")
                        .and_then(|c| c.parse::<f64>().ok())
                        .map(|c| (c, p.output_tok_s))
                })
                .collect()
        })
    };
    if a.is_some() {
        crate::plot::lines(
            &plots.join("throughput.svg"),
            "w2: total output tokens/s against clients",
            "clients",
            "output tokens/s",
            &[(STRATA.into(), pts(&a)), (PEER.into(), pts(&b))],
        )?;
        let _ = writeln!(
            s,
            "![Throughput against clients]({})\n",
            rel("throughput.svg")
        );
    }
    let (a, b) = (run(dir, STRATA, "w8"), run(dir, PEER, "w8"));
    let sweep = |r: &Option<RunResult>, p99: bool| -> Vec<(f64, f64)> {
        r.as_ref().map_or_else(Vec::new, |r| {
            r.phases
                .iter()
                .filter_map(|p| {
                    p.rate
                        .map(|x| (x, if p99 { p.ttft_ms.p99 } else { p.ttft_ms.p50 } / 1e3))
                })
                .collect()
        })
    };
    if a.is_some() {
        crate::plot::lines(
            &plots.join("rate-sweep.svg"),
            "w8: TTFT against request rate (s)",
            "requests/s (Poisson)",
            "TTFT, s",
            &[
                (format!("{STRATA} p50"), sweep(&a, false)),
                (format!("{PEER} p50"), sweep(&b, false)),
                (format!("{STRATA} p99 (light)"), sweep(&a, true)),
                (format!("{PEER} p99 (light)"), sweep(&b, true)),
            ],
        )?;
        let _ = writeln!(
            s,
            "![TTFT against request rate]({})\n",
            rel("rate-sweep.svg")
        );
    }
    // Every workload's tables.
    s.push_str("## Workloads\n\n");
    for &wl in crate::workload::BUILTIN {
        for label in [STRATA, STRATA_TIERS, PEER] {
            if let Some(r) = run(dir, label, wl) {
                s.push_str(&markdown(&r));
                if let Some(c) = &r.command {
                    let _ = writeln!(s, "\n`{c}`");
                }
                for p in &r.phases {
                    if p.ttft_by_tag_ms.len() > 1 {
                        let tags: Vec<String> = p
                            .ttft_by_tag_ms
                            .iter()
                            .map(|(k, d)| {
                                format!(
                                    "{k}: mean {:.0} ms, p50 {:.0} ms (n={})",
                                    d.mean, d.p50, d.n
                                )
                            })
                            .collect();
                        let _ = writeln!(s, "\n{}: TTFT by request: {}", p.name, tags.join("; "));
                    }
                    if let Some(c) = p.cached_tokens.filter(|_| p.prompt_tokens > 0) {
                        let _ = writeln!(
                            s,
                            "\n{}: prompt tokens found cached: {:.0}%",
                            p.name,
                            c as f64 * 100.0 / p.prompt_tokens as f64
                        );
                    }
                }
                s.push('\n');
            }
        }
    }
    if let Some(r) = load::<Roofline>(&dir.join("roofline.json")) {
        s.push_str("## The roofline\n\nDecode reads every weight and the context's KV once per token; prefill is int8 arithmetic. `strata bench roofline` measures, in the same run: a streaming read of a 1 GiB buffer (far past the last-level cache), the Q4_1 x int8 dot kernel on cache-resident data (the kernel prefill runs), and the forward pass itself (single sequence, no HTTP).\n\n");
        s.push_str(&roofline_table(&r));
        s.push('\n');
    }
    if let Some(p) = load::<Parity>(&dir.join("quality.json")) {
        s.push_str("## Quality parity\n\nThe same GGUF in both, the same tokens (llama.cpp's tokenization of the shipped text, chunks of the size below), every scored position compared.\n\n");
        s.push_str(&parity_table(&p));
        s.push('\n');
    }
    std::fs::write(out, s).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
