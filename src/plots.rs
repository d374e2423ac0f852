//! SVG plots of a pruning run (`--plots DIR`), drawn from the [`Report`] alone.
//!
//! Per unit kind: a heatmap of the criterion's score and one per feature the report holds
//! a value of (λ_min, λ_max, κ, ρ, tr K, Hessian trace): one row per layer (unit group), one cell per
//! unit coloured on viridis (perceptually uniform, readable in grey), pruned units crossed
//! out, layer names on the y axis and a colour bar with the minimum and maximum. A
//! quantity that is non-negative and whose positive values span two decades or more is drawn on a log10 scale, and
//! the title says so. Layers wider than [`MAX_COLUMNS`] units (MiniLM's 1536 FFN neurons)
//! are binned: units sorted by score within the layer, consecutive runs of equal size
//! averaged into one cell, a cell crossed when all its units are pruned and slashed when
//! some are; the title states the bin size. Per schedule step with a trained gate: its
//! training curve (task loss, held-out loss, penalty, total per epoch, the chosen epoch
//! marked).
//!
//! The SVG is written by hand (no plotting crate) with fixed number formatting and
//! deterministic ordering: the same report gives the same bytes. Cells carry
//! `data-units` / `data-pruned` and rows `data-layer`, so tests (and scripts) can check a
//! plot against the report.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::criteria::ntk::UnitFeatures;
use crate::error::{Error, Result};
use crate::report::{GroupReport, Report};
use crate::units::UnitKind;

/// Most cells per heatmap row; wider layers are binned.
pub const MAX_COLUMNS: usize = 256;

/// One rendered plot: file name (no folder) and SVG text.
pub struct Plot {
    pub file: String,
    pub svg: String,
}

/// Writes every plot of `report` into `dir` (created if missing), each file atomically.
/// Returns the paths written, in a fixed order.
pub fn write_all(dir: &Path, report: &Report) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut written = Vec::new();
    for p in render(report) {
        let path = dir.join(&p.file);
        crate::onnx_io::write_atomic(&path, p.svg.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// A per-unit quantity that can be drawn.
struct Quantity {
    /// File-name key.
    key: &'static str,
    /// What the title calls it.
    label: &'static str,
    get: fn(&UnitFeatures) -> Option<f64>,
}

const FEATURES: &[Quantity] = &[
    Quantity { key: "lambda_min", label: "NTK λ_min", get: |f| Some(f.lambda_min) },
    Quantity { key: "lambda_max", label: "NTK λ_max", get: |f| Some(f.lambda_max) },
    Quantity { key: "kappa", label: "NTK condition number κ = λ_max/λ_min", get: |f| f.kappa },
    Quantity { key: "rho", label: "NTK spectral entropy ρ", get: |f| Some(f.entropy) },
    Quantity { key: "trace_k", label: "NTK trace tr K", get: |f| Some(f.trace_k) },
    Quantity { key: "hessian", label: "Hessian trace tr H", get: |f| Some(f.hessian) },
];

/// Every plot the report supports, in a fixed order: per kind the score, then the
/// features; then the gate's curves per schedule step.
pub fn render(report: &Report) -> Vec<Plot> {
    let mut out = Vec::new();
    let criterion = report.scoring.as_ref().map(|s| s.criterion).unwrap_or(report.options.criterion);
    for kind in UnitKind::ALL {
        let groups: Vec<&GroupReport> =
            report.groups.iter().filter(|g| g.kind == kind && g.units.iter().any(|u| u.score.is_some())).collect();
        if groups.is_empty() {
            continue;
        }
        let layout = Layout::new(&groups);
        let scores: Vec<Vec<Option<f64>>> =
            groups.iter().map(|g| g.units.iter().map(|u| u.score.filter(|s| s.is_finite())).collect()).collect();
        out.push(Plot {
            file: format!("{}-score.svg", kind.name()),
            svg: heatmap(kind, &format!("criterion {criterion}: score"), &groups, &layout, &scores),
        });
        for q in FEATURES {
            let values: Vec<Vec<Option<f64>>> = groups
                .iter()
                .map(|g| {
                    g.units.iter().map(|u| u.features.as_ref().and_then(q.get).filter(|v| v.is_finite())).collect()
                })
                .collect();
            // A feature no unit has a value for (κ where every λ_min is 0) gets no plot.
            if values.iter().flatten().any(Option::is_some) {
                out.push(Plot {
                    file: format!("{}-{}.svg", kind.name(), q.key),
                    svg: heatmap(kind, q.label, &groups, &layout, &values),
                });
            }
        }
    }
    if let Some(c) = &report.ntk_condition {
        out.push(Plot { file: "ntk-condition.svg".into(), svg: condition_plot(c) });
    }
    if let Some(sc) = &report.scoring {
        for st in &sc.steps {
            if let Some(g) = &st.gate {
                out.push(Plot { file: format!("gate-step{}.svg", st.step), svg: gate_curve(st.step, st.ratio, g) });
            }
        }
    }
    out
}

/// Which units each cell of each row holds.
struct Layout {
    /// Units per cell (1 = unbinned, units in index order).
    bin: usize,
    /// Per row, per cell, the unit indices.
    cells: Vec<Vec<Vec<usize>>>,
    columns: usize,
}

impl Layout {
    fn new(groups: &[&GroupReport]) -> Layout {
        let widest = groups.iter().map(|g| g.units.len()).max().unwrap_or(0);
        let bin = widest.div_ceil(MAX_COLUMNS).max(1);
        let cells: Vec<Vec<Vec<usize>>> = groups
            .iter()
            .map(|g| {
                let mut order: Vec<usize> = (0..g.units.len()).collect();
                if bin > 1 {
                    // Highest score first; unscored last; ties by index (deterministic).
                    let key = |u: usize| g.units[u].score.filter(|s| s.is_finite()).unwrap_or(f64::NEG_INFINITY);
                    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
                }
                order.chunks(bin).map(<[usize]>::to_vec).collect()
            })
            .collect();
        let columns = cells.iter().map(Vec::len).max().unwrap_or(0);
        Layout { bin, cells, columns }
    }

    fn describe(&self) -> String {
        if self.bin == 1 {
            "one cell per unit, in unit order".into()
        } else {
            format!("units sorted by score within each layer, {} per cell (mean)", self.bin)
        }
    }
}

/// How values map to colours.
struct Scale {
    log: bool,
    /// Range in plot space (log10 when logarithmic).
    lo: f64,
    hi: f64,
    /// The smallest and largest value, as given.
    min: f64,
    max: f64,
}

impl Scale {
    fn of(values: impl Iterator<Item = f64>) -> Option<Scale> {
        let v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // Non-negative values whose positive part spans two decades: log scale, zeros
        // (a unit with λ_min = 0) drawn at the smallest positive value.
        let min_pos = v.iter().copied().filter(|&x| x > 0.0).fold(f64::INFINITY, f64::min);
        let log = lo >= 0.0 && min_pos.is_finite() && hi / min_pos >= 100.0;
        let (min, max) = (lo, hi);
        Some(if log {
            Scale { log, lo: min_pos.log10(), hi: hi.log10(), min, max }
        } else {
            Scale { log, lo, hi, min, max }
        })
    }

    /// The value in plot space (log10 when logarithmic).
    fn map(&self, x: f64) -> f64 {
        if self.log {
            x.log10().max(self.lo)
        } else {
            x
        }
    }

    /// Position in [0, 1] of a plot-space value.
    fn unit(&self, y: f64) -> f64 {
        if self.hi > self.lo {
            ((y - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)
        } else {
            0.5
        }
    }
}

/// Viridis at ten evenly spaced points (matplotlib's table).
const VIRIDIS: [(u8, u8, u8); 10] = [
    (0x44, 0x01, 0x54),
    (0x48, 0x28, 0x78),
    (0x3e, 0x49, 0x89),
    (0x31, 0x68, 0x8e),
    (0x26, 0x82, 0x8e),
    (0x1f, 0x9e, 0x89),
    (0x35, 0xb7, 0x79),
    (0x6e, 0xce, 0x58),
    (0xb5, 0xde, 0x2b),
    (0xfd, 0xe7, 0x25),
];

fn viridis(t: f64) -> String {
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (VIRIDIS.len() - 1) as f64;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f64;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    let mix = |p: u8, q: u8| (p as f64 + (q as f64 - p as f64) * f).round() as u8;
    format!("#{:02x}{:02x}{:02x}", mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Compact, fixed formatting of a value for labels.
fn num(x: f64) -> String {
    let a = x.abs();
    if x == 0.0 {
        "0".into()
    } else if (1e-3..1e4).contains(&a) {
        let s = format!("{x:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    } else {
        format!("{x:.3e}")
    }
}

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// A layer name shortened in the middle to at most `max` characters.
fn shorten(s: &str, max: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= max {
        return s.to_string();
    }
    let keep = max.saturating_sub(1);
    let head = keep / 3;
    let tail = keep - head;
    let mut o: String = chars[..head].iter().collect();
    o.push('…');
    o.extend(&chars[chars.len() - tail..]);
    o
}

const FONT: &str = "font-family=\"DejaVu Sans, Arial, sans-serif\"";

fn heatmap(
    kind: UnitKind,
    what: &str,
    groups: &[&GroupReport],
    layout: &Layout,
    values: &[Vec<Option<f64>>],
) -> String {
    // Cell values in plot space: the mean over the cell's units (geometric mean on a log
    // scale); None where no unit of the cell has a value.
    let scale = Scale::of(values.iter().flatten().flatten().copied());
    let cell_value = |r: usize, units: &[usize]| -> Option<f64> {
        let sc = scale.as_ref()?;
        let v: Vec<f64> = units.iter().filter_map(|&u| values[r][u]).collect();
        (!v.is_empty()).then(|| v.iter().map(|&x| sc.map(x)).sum::<f64>() / v.len() as f64)
    };

    let label_chars = groups.iter().map(|g| g.layer.chars().count()).max().unwrap_or(0).min(40);
    let left = 16.0 + label_chars as f64 * 6.2;
    let cols = layout.columns.max(1);
    let cw = (768.0 / cols as f64).clamp(3.0, 14.0);
    let ch = 14.0;
    let top = 58.0;
    let grid_w = cols as f64 * cw;
    let grid_h = groups.len() as f64 * ch;
    let bar_x = left + grid_w + 24.0;
    let width = bar_x + 110.0;
    let height = top + grid_h.max(90.0) + 48.0;

    let scale_note = match &scale {
        Some(s) if s.log => format!(
            "log10 colour scale (values span {:.1} decades{})",
            s.hi - s.lo,
            if s.min <= 0.0 { "; zeros drawn at the smallest positive value" } else { "" }
        ),
        Some(_) => "linear colour scale".to_string(),
        None => "no values".to_string(),
    };
    let pruned_total: usize = groups.iter().map(|g| g.units.iter().filter(|u| !u.kept).count()).sum();
    let units_total: usize = groups.iter().map(|g| g.units.len()).sum();
    let title = format!("{}: {} per unit", kind.name(), what);
    let missing = values.iter().flatten().filter(|v| v.is_none()).count();
    let subtitle = format!(
        "{} layers, {} units ({} pruned, marked ×); {}; {}{}",
        groups.len(),
        units_total,
        pruned_total,
        layout.describe(),
        scale_note,
        if missing > 0 { format!("; grey = no value ({missing} units)") } else { String::new() }
    );

    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" {FONT} font-size=\"11\">"
    );
    let _ = writeln!(s, "<title>{}</title>", esc(&format!("{title}. {subtitle}")));
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>");
    let _ = writeln!(s, "<text x=\"8\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>", esc(&title));
    let _ = writeln!(s, "<text x=\"8\" y=\"36\" fill=\"#444444\">{}</text>", esc(&subtitle));
    let _ = writeln!(
        s,
        "<g class=\"heatmap\" data-kind=\"{}\" data-bin=\"{}\" data-columns=\"{}\">",
        kind.name(),
        layout.bin,
        layout.columns
    );
    for (r, g) in groups.iter().enumerate() {
        let y = top + r as f64 * ch;
        let pruned = g.units.iter().filter(|u| !u.kept).count();
        let _ = writeln!(
            s,
            "<g class=\"row\" data-layer=\"{}\" data-units=\"{}\" data-pruned=\"{}\">",
            esc(&g.layer),
            g.units.len(),
            pruned
        );
        let _ = writeln!(
            s,
            "<text class=\"layer\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left - 6.0,
            y + ch - 3.5,
            esc(&shorten(&g.layer, 40))
        );
        for (c, units) in layout.cells[r].iter().enumerate() {
            let x = left + c as f64 * cw;
            let npruned = units.iter().filter(|&&u| !g.units[u].kept).count();
            let fill = match (cell_value(r, units), &scale) {
                (Some(v), Some(sc)) => viridis(sc.unit(v)),
                _ => "#d9d9d9".to_string(),
            };
            let _ = writeln!(
                s,
                "<rect class=\"cell\" x=\"{x:.2}\" y=\"{y:.1}\" width=\"{cw:.2}\" height=\"{ch:.1}\" fill=\"{fill}\" \
                 data-units=\"{}\" data-pruned=\"{npruned}\"/>",
                units.len()
            );
            if npruned > 0 {
                let (x0, y0, x1, y1) = (x + 0.6, y + 0.6, x + cw - 0.6, y + ch - 0.6);
                let (class, d) = if npruned == units.len() {
                    ("mark pruned", format!("M{x0:.2} {y0:.1}L{x1:.2} {y1:.1}M{x1:.2} {y0:.1}L{x0:.2} {y1:.1}"))
                } else {
                    ("mark partly-pruned", format!("M{x0:.2} {y1:.1}L{x1:.2} {y0:.1}"))
                };
                let _ = writeln!(
                    s,
                    "<path class=\"{class}\" d=\"{d}\" stroke=\"#ff3030\" stroke-width=\"{:.2}\" fill=\"none\"/>",
                    (cw / 6.0).clamp(0.6, 1.6)
                );
            }
        }
        let _ = writeln!(s, "</g>");
    }
    let _ = writeln!(s, "</g>");
    // X axis: ticks at a round step so that at most ~8 are drawn.
    let axis_y = top + grid_h;
    let _ = writeln!(
        s,
        "<line x1=\"{left:.1}\" y1=\"{axis_y:.1}\" x2=\"{:.1}\" y2=\"{axis_y:.1}\" stroke=\"#000000\"/>",
        left + grid_w
    );
    let step = [1usize, 2, 4, 8, 16, 32, 64, 128, 256].into_iter().find(|&k| cols / k <= 8).unwrap_or(256);
    for c in (0..cols).step_by(step) {
        let x = left + (c as f64 + 0.5) * cw;
        let label = if layout.bin == 1 { c.to_string() } else { format!("{}", c * layout.bin) };
        let _ = writeln!(
            s,
            "<line x1=\"{x:.2}\" y1=\"{axis_y:.1}\" x2=\"{x:.2}\" y2=\"{:.1}\" stroke=\"#000000\"/>\
             <text x=\"{x:.2}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            axis_y + 4.0,
            axis_y + 15.0
        );
    }
    let xlabel = if layout.bin == 1 { "unit index".to_string() } else { "rank by score (units)".to_string() };
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{xlabel}</text>",
        left + grid_w / 2.0,
        axis_y + 30.0
    );
    // Colour bar with min/max (actual values, also on a log scale).
    if let Some(sc) = &scale {
        let bh = grid_h.max(90.0);
        let _ = writeln!(s, "<defs><linearGradient id=\"cbar\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">");
        for (i, _) in VIRIDIS.iter().enumerate() {
            let t = i as f64 / (VIRIDIS.len() - 1) as f64;
            let _ = writeln!(s, "<stop offset=\"{t:.3}\" stop-color=\"{}\"/>", viridis(t));
        }
        let _ = writeln!(s, "</linearGradient></defs>");
        let _ = writeln!(
            s,
            "<g class=\"colorbar\" data-min=\"{:e}\" data-max=\"{:e}\" data-log=\"{}\">",
            sc.min, sc.max, sc.log
        );
        let _ = writeln!(
            s,
            "<rect x=\"{bar_x:.1}\" y=\"{top:.1}\" width=\"12\" height=\"{bh:.1}\" fill=\"url(#cbar)\" stroke=\"#000000\" stroke-width=\"0.5\"/>"
        );
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\">max {}</text>", bar_x + 16.0, top + 9.0, esc(&num(sc.max)));
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\">min {}</text>",
            bar_x + 16.0,
            top + bh,
            esc(&if sc.log && sc.min <= 0.0 { format!("{} (and 0)", num(10f64.powf(sc.lo))) } else { num(sc.min) })
        );
        if sc.log {
            let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\">(log10)</text>", bar_x + 16.0, top + bh / 2.0 + 4.0);
        }
        let _ = writeln!(s, "</g>");
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// The gate's training curve of one schedule step: two panels sharing the epoch axis,
/// task losses on top (with ranking by λ_min alone as dashed reference lines), penalty
/// and total below; the chosen epoch marked in both.
/// The model-level NTK condition number before and after pruning (`--ntk-condition`): two
/// bars on a log10 axis, with λ_min and λ_max under each; an infinite κ (λ_min ≤ 0) is
/// drawn as a hatched full-height bar. Bars carry `data-kappa` for scripts.
fn condition_plot(c: &crate::passes::measure_conditioning::Conditioning) -> String {
    let (width, height, base, top) = (420.0, 300.0, 240.0, 60.0);
    let kappas = [c.before.kappa, c.after.kappa];
    let finite: Vec<f64> = kappas.iter().flatten().copied().filter(|k| *k > 0.0).collect();
    let hi = finite.iter().cloned().fold(1.0f64, f64::max).log10().ceil().max(1.0);
    let y = |k: f64| base - (k.max(1.0).log10() / hi) * (base - top);
    let mut s = String::new();
    let title = "model-level NTK condition number κ = λ_max/λ_min, before and after pruning";
    let sub = format!("{} calibration samples, {} projections; log10 axis", c.samples, c.projections);
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" {FONT} font-size=\"11\">"
    );
    let _ = writeln!(s, "<title>{}</title>", esc(&format!("{title}. {sub}. Parameters: {}", c.parameters)));
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>");
    let _ = writeln!(s, "<text x=\"8\" y=\"18\" font-size=\"12\" font-weight=\"bold\">{}</text>", esc(title));
    let _ = writeln!(s, "<text x=\"8\" y=\"36\" fill=\"#444444\">{}</text>", esc(&sub));
    let _ = writeln!(s, "<line x1=\"60\" y1=\"{base}\" x2=\"400\" y2=\"{base}\" stroke=\"#000000\"/>");
    for d in 0..=hi as i64 {
        let yy = y(10f64.powi(d as i32));
        let _ = writeln!(
            s,
            "<text x=\"54\" y=\"{:.1}\" text-anchor=\"end\">1e{d}</text><line x1=\"58\" y1=\"{yy:.1}\" \
             x2=\"400\" y2=\"{yy:.1}\" stroke=\"#dddddd\"/>",
            yy + 4.0
        );
    }
    for (i, (label, sp)) in [("before", &c.before), ("after", &c.after)].into_iter().enumerate() {
        let x = 110.0 + 150.0 * i as f64;
        let (yy, fill, text) = match sp.kappa {
            Some(k) => (y(k), if i == 0 { "#3b528b" } else { "#21918c" }, num(k)),
            None => (top, "#bbbbbb", "inf".to_string()),
        };
        let _ = writeln!(
            s,
            "<rect class=\"bar\" data-kappa=\"{}\" x=\"{x:.1}\" y=\"{yy:.1}\" width=\"80\" height=\"{:.1}\" \
             fill=\"{fill}\"/>",
            sp.kappa.map_or("inf".to_string(), |k| format!("{k:e}")),
            base - yy
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">κ {}</text>",
            x + 40.0,
            yy - 6.0,
            esc(&text)
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-weight=\"bold\">{label}</text>",
            x + 40.0,
            base + 16.0
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#444444\">λ {} … {}</text>",
            x + 40.0,
            base + 32.0,
            esc(&num(sp.lambda_min)),
            esc(&num(sp.lambda_max))
        );
    }
    s.push_str("</svg>\n");
    s
}

fn gate_curve(step: usize, ratio: f64, g: &crate::criteria::gate::GateTraining) -> String {
    let epochs = g.curve.len();
    let (left, width, panel_h, gap) = (64.0, 720.0, 170.0, 44.0);
    let plot_w = width - left - 150.0;
    let top1 = 56.0;
    let top2 = top1 + panel_h + gap;
    let height = top2 + panel_h + 44.0;
    let xat = |e: usize| left + if epochs > 1 { e as f64 * plot_w / (epochs - 1) as f64 } else { plot_w / 2.0 };
    let mut s = String::new();
    let title = format!("gate training, schedule step {step} (ratio {}): per-epoch curves", num(ratio));
    let sub = format!(
        "best epoch {} (lowest {} objective) marked; dashed grey = ranking by λ_min alone",
        g.best_epoch,
        if g.curve.iter().any(|e| e.val_loss.is_some()) { "held-out" } else { "calibration" }
    );
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" {FONT} font-size=\"11\">"
    );
    let _ = writeln!(s, "<title>{}</title>", esc(&format!("{title}. {sub}")));
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>");
    let _ = writeln!(s, "<text x=\"8\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>", esc(&title));
    let _ = writeln!(s, "<text x=\"8\" y=\"36\" fill=\"#444444\">{}</text>", esc(&sub));

    type Series<'a> = (&'a str, &'a str, Vec<Option<f64>>);
    let loss: Vec<Option<f64>> = g.curve.iter().map(|e| Some(e.loss)).collect();
    let val: Vec<Option<f64>> = g.curve.iter().map(|e| e.val_loss).collect();
    let pen: Vec<Option<f64>> = g.curve.iter().map(|e| Some(e.penalty)).collect();
    let tot: Vec<Option<f64>> = g.curve.iter().map(|e| Some(e.total)).collect();
    let mut top_series: Vec<Series> = vec![("loss (calibration)", "#1f77b4", loss)];
    if val.iter().any(Option::is_some) {
        top_series.push(("held-out loss", "#ff7f0e", val));
    }
    let mut refs = vec![g.lambda_min_loss];
    refs.extend(g.lambda_min_val_loss);
    let panels: [(&str, f64, Vec<Series>, Vec<f64>); 2] = [
        ("task loss", top1, top_series, refs),
        ("penalty Σ m·h and total", top2, vec![("penalty", "#2ca02c", pen), ("total", "#d62728", tot)], vec![]),
    ];
    for (name, top, series, refs) in panels {
        let all: Vec<f64> =
            series.iter().flat_map(|(_, _, v)| v.iter().flatten().copied()).chain(refs.iter().copied()).collect();
        let all: Vec<f64> = all.into_iter().filter(|x| x.is_finite()).collect();
        let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if !lo.is_finite() {
            (0.0, 1.0)
        } else if hi > lo {
            let pad = (hi - lo) * 0.05;
            (lo - pad, hi + pad)
        } else {
            (lo - 0.5, hi + 0.5)
        };
        let yat = |v: f64| top + panel_h - (v - lo) / (hi - lo) * panel_h;
        let _ = writeln!(s, "<g class=\"panel\" data-name=\"{}\">", esc(name));
        let _ = writeln!(
            s,
            "<rect x=\"{left:.1}\" y=\"{top:.1}\" width=\"{plot_w:.1}\" height=\"{panel_h:.1}\" fill=\"none\" stroke=\"#000000\"/>"
        );
        let _ = writeln!(s, "<text x=\"{left:.1}\" y=\"{:.1}\" font-weight=\"bold\">{}</text>", top - 6.0, esc(name));
        for (v, anchor_y) in [(hi, top + 4.0), (lo, top + panel_h)] {
            let _ =
                writeln!(s, "<text x=\"{:.1}\" y=\"{anchor_y:.1}\" text-anchor=\"end\">{}</text>", left - 4.0, num(v));
        }
        for r in &refs {
            let y = yat(*r);
            let _ = writeln!(
                s,
                "<line class=\"reference\" x1=\"{left:.1}\" y1=\"{y:.2}\" x2=\"{:.1}\" y2=\"{y:.2}\" stroke=\"#888888\" stroke-dasharray=\"4 3\"/>",
                left + plot_w
            );
        }
        for (i, (label, colour, v)) in series.iter().enumerate() {
            let pts: Vec<String> = v
                .iter()
                .enumerate()
                .filter_map(|(e, y)| y.filter(|y| y.is_finite()).map(|y| format!("{:.2},{:.2}", xat(e), yat(y))))
                .collect();
            let _ = writeln!(
                s,
                "<polyline class=\"series\" data-name=\"{}\" data-points=\"{}\" points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\"/>",
                esc(label),
                pts.len(),
                pts.join(" ")
            );
            let ly = top + 12.0 + i as f64 * 16.0;
            let lx = left + plot_w + 10.0;
            let _ = writeln!(
                s,
                "<line x1=\"{lx:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-width=\"2\"/>\
                 <text x=\"{:.1}\" y=\"{ly:.1}\">{}</text>",
                ly - 4.0,
                lx + 18.0,
                ly - 4.0,
                lx + 22.0,
                esc(label)
            );
        }
        let bx = xat(g.best_epoch.min(epochs.saturating_sub(1)));
        let _ = writeln!(
            s,
            "<line class=\"best-epoch\" data-epoch=\"{}\" x1=\"{bx:.2}\" y1=\"{top:.1}\" x2=\"{bx:.2}\" y2=\"{:.1}\" \
             stroke=\"#000000\" stroke-dasharray=\"2 2\"/>",
            g.best_epoch,
            top + panel_h
        );
        let _ = writeln!(s, "<text x=\"{:.2}\" y=\"{:.1}\">best epoch {}</text>", bx + 3.0, top + 12.0, g.best_epoch);
        let _ = writeln!(s, "</g>");
    }
    // Epoch axis under the lower panel.
    let axis_y = top2 + panel_h;
    let step = [1usize, 2, 5, 10, 20, 50, 100, 200, 500, 1000].into_iter().find(|&k| epochs / k <= 10).unwrap_or(1000);
    for e in (0..epochs).step_by(step) {
        let x = xat(e);
        let _ = writeln!(s, "<text x=\"{x:.2}\" y=\"{:.1}\" text-anchor=\"middle\">{e}</text>", axis_y + 14.0);
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">epoch (0 = initialisation fitted to λ_min)</text>",
        left + plot_w / 2.0,
        axis_y + 30.0
    );
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viridis_ends_and_middle() {
        assert_eq!(viridis(0.0), "#440154");
        assert_eq!(viridis(1.0), "#fde725");
        assert_eq!(viridis(f64::NAN), "#440154");
        assert_eq!(viridis(2.0), "#fde725");
    }

    #[test]
    fn log_scale_only_for_positive_values_spanning_decades() {
        assert!(Scale::of([1e-3, 1.0].into_iter()).unwrap().log);
        let z = Scale::of([0.0, 1e-3, 1.0].into_iter()).unwrap();
        assert!(z.log && z.min == 0.0 && z.lo == -3.0 && z.map(0.0) == -3.0);
        assert!(!Scale::of([1.0, 50.0].into_iter()).unwrap().log);
        assert!(!Scale::of([-1.0, 1e6].into_iter()).unwrap().log);
        assert!(Scale::of([f64::NAN].into_iter()).is_none());
    }

    fn group(layer: &str, n: usize, pruned_below: f64) -> GroupReport {
        let units: Vec<crate::report::UnitReport> = (0..n)
            .map(|u| {
                // Scores in a scrambled order so that sorting matters.
                let score = ((u * 7919) % n) as f64 / n as f64;
                crate::report::UnitReport { index: u, score: Some(score), kept: score >= pruned_below, features: None }
            })
            .collect();
        GroupReport {
            kind: UnitKind::Neurons,
            layer: layer.into(),
            units_before: n,
            units_after: units.iter().filter(|u| u.kept).count(),
            params_per_unit: 1,
            pruned: units.iter().filter(|u| !u.kept).map(|u| u.index).collect(),
            cache: Vec::new(),
            scores: units.iter().map(|u| u.score.unwrap()).collect(),
            units,
        }
    }

    fn attr_sum(svg: &str, element: &str, attr: &str) -> (usize, usize) {
        let mut n = 0;
        let mut sum = 0;
        for piece in svg.split(&format!("<{element} ")).skip(1) {
            let head = &piece[..piece.find('>').unwrap()];
            if let Some(i) = head.find(&format!("{attr}=\"")) {
                let rest = &head[i + attr.len() + 2..];
                sum += rest[..rest.find('"').unwrap()].parse::<usize>().unwrap();
                n += 1;
            }
        }
        (n, sum)
    }

    #[test]
    fn wide_layers_are_binned_to_at_most_max_columns() {
        let g = [group("/ffn.0/MatMul", 1536, 0.5), group("/ffn.1/MatMul", 1536, 0.25)];
        let groups: Vec<&GroupReport> = g.iter().collect();
        let layout = Layout::new(&groups);
        assert_eq!(layout.bin, 6);
        assert_eq!(layout.columns, 256);
        let values: Vec<Vec<Option<f64>>> = g.iter().map(|g| g.units.iter().map(|u| u.score).collect()).collect();
        let svg = heatmap(UnitKind::Neurons, "score", &groups, &layout, &values);
        assert!(svg.contains("6 per cell"), "the title states the binning");
        let (cells, units) = attr_sum(&svg, "rect class=\"cell\"", "data-units");
        assert_eq!((cells, units), (512, 3072));
        let (_, pruned) = attr_sum(&svg, "rect class=\"cell\"", "data-pruned");
        let want: usize = g.iter().map(|g| g.pruned.len()).sum();
        assert_eq!(pruned, want);
        // Sorted by score, the pruned units (the lowest scores) fill whole cells at the end
        // of each row: at most one partly pruned cell per row.
        let full: usize = g.iter().map(|g| g.pruned.len() / 6).sum();
        let partial = g.iter().filter(|g| g.pruned.len() % 6 != 0).count();
        assert_eq!(svg.matches("class=\"mark pruned\"").count(), full);
        assert_eq!(svg.matches("class=\"mark partly-pruned\"").count(), partial);
        assert!(svg.len() < 200_000, "{} bytes", svg.len());
        // Same input, same bytes.
        assert_eq!(svg, heatmap(UnitKind::Neurons, "score", &groups, &layout, &values));
    }

    #[test]
    fn narrow_layers_get_one_cell_per_unit_in_index_order() {
        let g = [group("a", 10, 0.5), group("b", 4, 0.0)];
        let groups: Vec<&GroupReport> = g.iter().collect();
        let layout = Layout::new(&groups);
        assert_eq!(layout.bin, 1);
        assert_eq!(layout.cells[0], (0..10).map(|u| vec![u]).collect::<Vec<_>>());
        assert_eq!(layout.cells[1].len(), 4);
    }

    #[test]
    fn names_are_escaped_and_shortened() {
        assert_eq!(esc("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&apos;");
        let s = shorten("/encoder/layer.0/intermediate/dense/MatMul_long_suffix_here", 20);
        assert_eq!(s.chars().count(), 20);
        assert!(s.contains('…') && s.starts_with("/enc") && s.ends_with("here"));
    }
}
