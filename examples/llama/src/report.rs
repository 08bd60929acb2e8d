//! The sweep's outputs: a CSV, an SVG plot of accuracy against budget per policy, and a
//! table for the terminal.

use std::fmt::Write as _;
use std::path::Path;

use crate::sweep::{Cell, CellKey, SweepResult};
use crate::tasks::Task;

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or(String::new(), |x| format!("{x:.digits$}"))
}

/// Dense perplexity of the same context, for the change columns.
fn dense_ppl(r: &SweepResult, context: usize) -> Option<f64> {
    r.cells.get(&(context, "dense".to_string(), crate::sweep::frac_key(1.0))).and_then(Cell::perplexity)
}

fn dense_cell(r: &SweepResult, context: usize) -> Option<&Cell> {
    r.cells.get(&(context, "dense".to_string(), crate::sweep::frac_key(1.0)))
}

fn budget_label(key: &CellKey) -> String {
    let f = key.2 as f64 / 65536.0;
    if (f - 1.0).abs() < 1e-9 {
        "1".into()
    } else {
        format!("1/{}", (1.0 / f).round())
    }
}

struct Row<'a> {
    key: &'a CellKey,
    cell: &'a Cell,
}

impl Row<'_> {
    fn per_step(&self, total: f64) -> Option<f64> {
        (self.cell.decode_steps > 0).then(|| total / self.cell.decode_steps as f64)
    }
    fn ppl_change_pct(&self, r: &SweepResult) -> Option<f64> {
        Some((self.cell.perplexity()? / dense_ppl(r, self.key.0)? - 1.0) * 100.0)
    }
    fn prefill(&self) -> Option<f64> {
        (self.cell.prefills > 0).then(|| self.cell.prefill_secs / self.cell.prefills as f64)
    }
    fn held_mb(&self) -> Option<f64> {
        (self.cell.kv_samples > 0).then(|| self.cell.kv_bytes_held / self.cell.kv_samples as f64 / 1e6)
    }
    fn peak_mb(&self) -> Option<f64> {
        (self.cell.kv_samples > 0).then(|| self.cell.kv_bytes_peak / self.cell.kv_samples as f64 / 1e6)
    }
}

fn rows(r: &SweepResult) -> Vec<Row<'_>> {
    let mut rows: Vec<Row> = r.cells.iter().map(|(key, cell)| Row { key, cell }).collect();
    rows.sort_by(|a, b| {
        (a.key.0, a.key.1 != "dense", &a.key.1, std::cmp::Reverse(a.key.2)).cmp(&(
            b.key.0,
            b.key.1 != "dense",
            &b.key.1,
            std::cmp::Reverse(b.key.2),
        ))
    });
    rows
}

/// One row per retrieval trial and policy: context, policy, budget, task, depth of the fact,
/// the expected digits, the generated text (quoted, quotes doubled) and whether it answered.
pub fn write_trials_csv(r: &SweepResult, path: &Path) -> std::io::Result<()> {
    let mut s = String::from("context,policy,budget,task,depth,answer,generated,correct\n");
    for t in &r.trials {
        writeln!(
            s,
            "{},{},{},{},{:.3},{},\"{}\",{}",
            t.key.0,
            t.key.1,
            budget_label(&t.key),
            t.task,
            t.depth,
            t.answer,
            t.generated.replace('"', "\"\"").replace('\n', "\\n"),
            u8::from(t.correct)
        )
        .unwrap();
    }
    std::fs::write(path, s)
}

pub fn write_csv(r: &SweepResult, path: &Path) -> std::io::Result<()> {
    let mut s = String::from(
        "context,policy,budget,budget_tokens,passkey_accuracy,passkey_trials,needle_accuracy,needle_trials,passkey_chat_accuracy,passkey_chat_trials,needle_chat_accuracy,needle_chat_trials,perplexity,perplexity_dense,perplexity_change_pct,kv_bytes_per_step,dense_kv_bytes_per_step,attention_ms_per_step,dense_attention_ms_per_step,prefill_s,kv_mb_held,kv_mb_peak,policy_text\n",
    );
    for row in rows(r) {
        let c = row.cell;
        let dense = dense_cell(r, row.key.0);
        let dense_attn =
            dense.and_then(|d| (d.decode_steps > 0).then(|| d.attention_secs / d.decode_steps as f64 * 1e3));
        let trials = |t: Task| c.correct.get(t.name()).map_or(0, |x| x.1);
        writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},\"{}\"",
            row.key.0,
            row.key.1,
            budget_label(row.key),
            c.budget_tokens,
            fmt_opt(c.accuracy(Task::Passkey), 4),
            trials(Task::Passkey),
            fmt_opt(c.accuracy(Task::Needle), 4),
            trials(Task::Needle),
            fmt_opt(c.accuracy(Task::PasskeyKjvChat), 4),
            trials(Task::PasskeyKjvChat),
            fmt_opt(c.accuracy(Task::NeedleChat), 4),
            trials(Task::NeedleChat),
            fmt_opt(c.perplexity(), 5),
            fmt_opt(dense_ppl(r, row.key.0), 5),
            fmt_opt(row.ppl_change_pct(r), 3),
            fmt_opt(row.per_step(c.kv_bytes), 0),
            fmt_opt(dense.and_then(|d| (d.decode_steps > 0).then(|| d.kv_bytes / d.decode_steps as f64)), 0),
            fmt_opt(row.per_step(c.attention_secs * 1e3), 4),
            fmt_opt(dense_attn, 4),
            fmt_opt(row.prefill(), 3),
            fmt_opt(row.held_mb(), 2),
            fmt_opt(row.peak_mb(), 2),
            c.policy_text.replace('"', "'"),
        )
        .unwrap();
    }
    std::fs::write(path, s)
}

/// A readable table of the sweep.
pub fn table(r: &SweepResult) -> String {
    let mut s = String::new();
    writeln!(
        s,
        "{:>7} {:<13} {:>6} {:>8} {:>7} {:>8} {:>7} {:>7} {:>8} {:>10} {:>9} {:>10} {:>9} {:>8}",
        "context",
        "policy",
        "budget",
        "passkey",
        "needle",
        "pk chat",
        "nd chat",
        "ppl",
        "ppl Δ%",
        "KV KB/step",
        "KV/dense",
        "attn ms",
        "prefill s",
        "peak MB"
    )
    .unwrap();
    for row in rows(r) {
        let c = row.cell;
        let acc = |t: Task| c.accuracy(t).map_or("-".to_string(), |a| format!("{:.0}%", a * 100.0));
        let dense = dense_cell(r, row.key.0).filter(|d| d.decode_steps > 0).map(|d| d.kv_bytes / d.decode_steps as f64);
        let ratio = match (row.per_step(c.kv_bytes), dense) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
            _ => "-".into(),
        };
        writeln!(
            s,
            "{:>7} {:<13} {:>6} {:>8} {:>7} {:>8} {:>7} {:>7} {:>8} {:>10} {:>9} {:>10} {:>9} {:>8}",
            row.key.0,
            row.key.1,
            budget_label(row.key),
            acc(Task::Passkey),
            acc(Task::Needle),
            acc(Task::PasskeyKjvChat),
            acc(Task::NeedleChat),
            c.perplexity().map_or("-".into(), |p| format!("{p:.3}")),
            row.ppl_change_pct(r).map_or("-".into(), |p| format!("{p:+.2}")),
            row.per_step(c.kv_bytes).map_or("-".into(), |b| format!("{:.0}", b / 1024.0)),
            ratio,
            row.per_step(c.attention_secs * 1e3).map_or("-".into(), |t| format!("{t:.2}")),
            row.prefill().map_or("-".into(), |t| format!("{t:.2}")),
            row.peak_mb().map_or("-".into(), |m| format!("{m:.1}")),
        )
        .unwrap();
    }
    s
}

const COLORS: [&str; 8] = ["#000000", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"];

/// Accuracy (retrieval tasks pooled) against KV budget, one line per policy, one panel per
/// context length. The budget axis is logarithmic; dense sits at budget 1.
pub fn write_svg(r: &SweepResult, path: &Path) -> std::io::Result<()> {
    let contexts: Vec<usize> = {
        let mut c: Vec<usize> = r.cells.keys().map(|k| k.0).collect();
        c.dedup();
        c
    };
    let mut policies: Vec<String> = r.cells.keys().map(|k| k.1.clone()).collect();
    policies.sort();
    policies.dedup();
    policies.sort_by_key(|p| p != "dense");
    let fracs: Vec<f64> = r.cells.keys().map(|k| k.2 as f64 / 65536.0).collect();
    let lo = fracs.iter().cloned().fold(1.0, f64::min).log2().floor().min(-1.0);
    let (pw, ph, ml, mt, gap) = (300.0, 220.0, 60.0, 60.0, 40.0);
    let width = (ml + contexts.len() as f64 * (pw + gap) + 150.0).max(640.0);
    let height = mt + ph + 60.0;
    let mut s = String::new();
    writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#).unwrap();
    writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#).unwrap();
    writeln!(s, r#"<text x="{ml}" y="20" font-size="14">Retrieval accuracy (passkey + needle) vs KV budget: SmolLM2-135M on kvsieve</text>"#).unwrap();
    for (ci, &ctx) in contexts.iter().enumerate() {
        let x0 = ml + ci as f64 * (pw + gap);
        let (y0, y1) = (mt, mt + ph);
        let sx = |f: f64| x0 + (f.log2() - lo) / (0.0 - lo) * pw;
        let sy = |a: f64| y1 - a * ph;
        writeln!(s, r#"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#).unwrap();
        writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{ctx} tokens</text>"#, x0 + pw / 2.0, y0 - 6.0)
            .unwrap();
        for a in [0.0, 0.25, 0.5, 0.75, 1.0] {
            writeln!(s, r##"<line x1="{x0}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{:.0}%</text>"##, x0 + pw, x0 - 4.0, sy(a) + 4.0, a * 100.0, y = sy(a)).unwrap();
        }
        let mut e = lo as i32;
        while e <= 0 {
            let f = 2f64.powi(e);
            let label = if e == 0 { "1".to_string() } else { format!("1/{}", 1 << -e) };
            writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{label}</text>"#, sx(f), y1 + 16.0).unwrap();
            e += 1;
        }
        writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">KV budget (fraction of context)</text>"#,
            x0 + pw / 2.0,
            y1 + 34.0
        )
        .unwrap();
        for (pi, p) in policies.iter().enumerate() {
            let color = COLORS[pi % COLORS.len()];
            let mut pts: Vec<(f64, f64)> = r
                .cells
                .iter()
                .filter(|(k, _)| k.0 == ctx && &k.1 == p)
                .filter_map(|(k, c)| {
                    let (ok, n) = c.correct.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
                    (n > 0).then(|| (k.2 as f64 / 65536.0, ok as f64 / n as f64))
                })
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            if p == "dense" {
                if let Some(&(_, a)) = pts.first() {
                    writeln!(
                        s,
                        r#"<line x1="{x0}" x2="{}" y1="{y}" y2="{y}" stroke="{color}" stroke-dasharray="4 3"/>"#,
                        x0 + pw,
                        y = sy(a)
                    )
                    .unwrap();
                }
                continue;
            }
            let path: Vec<String> = pts.iter().map(|&(f, a)| format!("{:.1},{:.1}", sx(f), sy(a))).collect();
            if !path.is_empty() {
                let dash = if pi % 2 == 0 { r#" stroke-dasharray="7 3""# } else { "" };
                writeln!(
                    s,
                    r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                    path.join(" ")
                )
                .unwrap();
            }
            for &(f, a) in &pts {
                writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, sx(f), sy(a)).unwrap();
            }
        }
    }
    let lx = ml + contexts.len() as f64 * (pw + gap);
    for (pi, p) in policies.iter().enumerate() {
        let y = mt + 10.0 + pi as f64 * 18.0;
        let dash = if p == "dense" {
            r#" stroke-dasharray="4 3""#
        } else if pi % 2 == 0 {
            r#" stroke-dasharray="7 3""#
        } else {
            ""
        };
        writeln!(s, r#"<line x1="{lx}" x2="{}" y1="{y}" y2="{y}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{p}</text>"#, lx + 20.0, COLORS[pi % COLORS.len()], lx + 26.0, y + 4.0).unwrap();
    }
    writeln!(s, "</svg>").unwrap();
    std::fs::write(path, s)
}
