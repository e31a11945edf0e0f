//! `benchplot CHARTS.json OUTDIR`: draws the benchmark suite's PNG charts.
//!
//! The suite (`hack/bench/suite.sh`, its summary step `hack/bench/report.py`)
//! writes a chart list, and this program draws each chart into
//! `OUTDIR/<file>` with the plotters bitmap backend. Three kinds:
//!
//! - `lines`: median of each x with its min-max spread as an error bar
//!   (downtime or total time against dirty rate or link rate);
//! - `bars`: groups of bars (one per way of migrating) with min-max bars;
//! - `timeline`: requests per second over time, one panel per migration,
//!   failed requests in red and the migration's phases marked.
//!
//! Text is drawn with a TrueType font loaded at run time: `$BENCHPLOT_FONT`,
//! or DejaVu Sans from Debian's fonts-dejavu-core, or any `.ttf` under
//! `/usr/share/fonts`. No fontconfig, no freetype.

use std::fmt;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::register_font;
use serde::Deserialize;

/// A failure with its explanation.
#[derive(Debug)]
struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for Error {
    fn from(e: E) -> Self {
        Error(e.to_string())
    }
}

type Result<T> = std::result::Result<T, Error>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}

/// The chart list the summary step writes.
#[derive(Deserialize)]
struct Charts {
    charts: Vec<Chart>,
}

/// One chart.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Chart {
    Lines(Lines),
    Bars(Bars),
    Timeline(Timeline),
}

/// A point: median with its spread.
#[derive(Deserialize, Clone, Copy)]
struct Point {
    x: f64,
    med: f64,
    min: f64,
    max: f64,
}

#[derive(Deserialize)]
struct LineSeries_ {
    name: String,
    points: Vec<Point>,
}

#[derive(Deserialize)]
struct Lines {
    file: String,
    title: String,
    x_label: String,
    y_label: String,
    #[serde(default)]
    log_x: bool,
    series: Vec<LineSeries_>,
}

/// Median, min, max of one bar.
#[derive(Deserialize, Clone, Copy)]
struct Spread {
    med: f64,
    min: f64,
    max: f64,
}

#[derive(Deserialize)]
struct BarSeries {
    name: String,
    /// One per group; `null` when there is no figure.
    values: Vec<Option<Spread>>,
}

#[derive(Deserialize)]
struct Bars {
    file: String,
    title: String,
    y_label: String,
    groups: Vec<String>,
    series: Vec<BarSeries>,
}

#[derive(Deserialize)]
struct Mark {
    t: f64,
    label: String,
}

#[derive(Deserialize)]
struct Panel {
    name: String,
    interval_s: f64,
    ok: Vec<f64>,
    failed: Vec<f64>,
    #[serde(default)]
    marks: Vec<Mark>,
    /// A shaded span (the downtime), from..to in seconds.
    #[serde(default)]
    span: Option<(f64, f64)>,
}

#[derive(Deserialize)]
struct Timeline {
    file: String,
    title: String,
    panels: Vec<Panel>,
}

const W: u32 = 1000;
const FONT: &str = "sans-serif";

fn palette(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(214, 39, 40),
        RGBColor(140, 86, 75),
    ];
    C[i % C.len()]
}

/// Finds a TrueType font and registers it as plotters' sans-serif.
fn load_font() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("BENCHPLOT_FONT") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into());
    candidates.extend(find_ttf(Path::new("/usr/share/fonts"), 4));
    for path in candidates {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        // plotters keeps the font for the whole run.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        if register_font(FONT, FontStyle::Normal, bytes).is_ok() {
            // Bold titles use the same face.
            let _ = register_font(FONT, FontStyle::Bold, bytes);
            return Ok(path);
        }
    }
    err("no usable TrueType font: set BENCHPLOT_FONT or apt-get install fonts-dejavu-core")
}

fn find_ttf(dir: &Path, depth: u32) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() && depth > 0 {
            out.extend(find_ttf(&p, depth - 1));
        } else if p.extension().is_some_and(|e| e == "ttf") {
            out.push(p);
        }
    }
    out
}

/// Names the chart file in a drawing error.
trait Ctx<T> {
    fn ctx(self, file: &str) -> Result<T>;
}

impl<T, E: fmt::Debug> Ctx<T> for std::result::Result<T, E> {
    fn ctx(self, file: &str) -> Result<T> {
        self.map_err(|e| Error(format!("{file}: {e:?}")))
    }
}

fn lines(c: &Lines, out: &Path) -> Result<()> {
    let path = out.join(&c.file);
    let root = BitMapBackend::new(&path, (W, 560)).into_drawing_area();
    let f = c.file.as_str();
    root.fill(&WHITE).ctx(f)?;
    let pts = c.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for p in pts {
        x0 = x0.min(p.x);
        x1 = x1.max(p.x);
        y1 = y1.max(p.max).max(p.med);
    }
    if x0 > x1 {
        return err(format!("{}: no points", c.file));
    }
    let y1 = if y1 > 0.0 { y1 * 1.12 } else { 1.0 };
    let mut b = ChartBuilder::on(&root);
    b.caption(&c.title, (FONT, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    if c.log_x {
        let lo = if x0 > 0.0 { x0 / 1.6 } else { 0.1 };
        let mut ch = b
            .build_cartesian_2d((lo..x1 * 1.6).log_scale(), 0.0..y1)
            .ctx(f)?;
        ch.configure_mesh()
            .x_desc(&c.x_label)
            .y_desc(&c.y_label)
            .label_style((FONT, 14))
            .draw()
            .ctx(f)?;
        for (i, s) in c.series.iter().enumerate() {
            let col = palette(i);
            ch.draw_series(LineSeries::new(
                s.points.iter().map(|p| (p.x, p.med)),
                col.stroke_width(2),
            ))
            .ctx(f)?
            .label(&s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
            ch.draw_series(s.points.iter().map(|p| {
                ErrorBar::new_vertical(p.x, p.min, p.med, p.max, col.stroke_width(2), 10)
            }))
            .ctx(f)?;
            ch.draw_series(
                s.points
                    .iter()
                    .map(|p| Circle::new((p.x, p.med), 4, col.filled())),
            )
            .ctx(f)?;
        }
        ch.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .ctx(f)?;
    } else {
        let pad = ((x1 - x0) * 0.06).max(1.0);
        let mut ch = b
            .build_cartesian_2d((x0 - pad)..(x1 + pad), 0.0..y1)
            .ctx(f)?;
        ch.configure_mesh()
            .x_desc(&c.x_label)
            .y_desc(&c.y_label)
            .label_style((FONT, 14))
            .draw()
            .ctx(f)?;
        for (i, s) in c.series.iter().enumerate() {
            let col = palette(i);
            ch.draw_series(LineSeries::new(
                s.points.iter().map(|p| (p.x, p.med)),
                col.stroke_width(2),
            ))
            .ctx(f)?
            .label(&s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
            ch.draw_series(s.points.iter().map(|p| {
                ErrorBar::new_vertical(p.x, p.min, p.med, p.max, col.stroke_width(2), 10)
            }))
            .ctx(f)?;
            ch.draw_series(
                s.points
                    .iter()
                    .map(|p| Circle::new((p.x, p.med), 4, col.filled())),
            )
            .ctx(f)?;
        }
        ch.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .ctx(f)?;
    }
    root.present().ctx(f)?;
    Ok(())
}

fn bars(c: &Bars, out: &Path) -> Result<()> {
    let path = out.join(&c.file);
    let root = BitMapBackend::new(&path, (W, 560)).into_drawing_area();
    let f = c.file.as_str();
    root.fill(&WHITE).ctx(f)?;
    let n = c.groups.len();
    if n == 0 {
        return err(format!("{}: no groups", c.file));
    }
    let y1 = c
        .series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .fold(0.0f64, |m, v| m.max(v.max).max(v.med));
    let y1 = if y1 > 0.0 { y1 * 1.15 } else { 1.0 };
    let groups = c.groups.clone();
    let mut ch = ChartBuilder::on(&root)
        .caption(&c.title, (FONT, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0.0..y1)
        .ctx(f)?;
    ch.configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 && (i as usize) < groups.len() {
                groups[i as usize].clone()
            } else {
                String::new()
            }
        })
        .y_desc(&c.y_label)
        .label_style((FONT, 14))
        .draw()
        .ctx(f)?;
    let k = c.series.len().max(1) as f64;
    let width = 0.8 / k;
    for (si, s) in c.series.iter().enumerate() {
        let col = palette(si);
        let left = |g: usize| g as f64 - 0.4 + si as f64 * width;
        ch.draw_series(s.values.iter().enumerate().filter_map(|(g, v)| {
            v.map(|v| {
                Rectangle::new(
                    [(left(g) + 0.01, 0.0), (left(g) + width - 0.01, v.med)],
                    col.filled(),
                )
            })
        }))
        .ctx(f)?
        .label(&s.name)
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], col.filled()));
        ch.draw_series(s.values.iter().enumerate().filter_map(|(g, v)| {
            v.map(|v| {
                ErrorBar::new_vertical(
                    left(g) + width / 2.0,
                    v.min,
                    v.med,
                    v.max,
                    BLACK.stroke_width(1),
                    8,
                )
            })
        }))
        .ctx(f)?;
        ch.draw_series(s.values.iter().enumerate().filter_map(|(g, v)| {
            v.map(|v| {
                Text::new(
                    fmt_num(v.med),
                    (left(g) + 0.01, v.max.max(v.med) + y1 * 0.015),
                    (FONT, 12),
                )
            })
        }))
        .ctx(f)?;
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .ctx(f)?;
    root.present().ctx(f)?;
    Ok(())
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn timeline(c: &Timeline, out: &Path) -> Result<()> {
    let path = out.join(&c.file);
    let n = c.panels.len().max(1);
    let h = 90 + 230 * n as u32;
    let root = BitMapBackend::new(&path, (W, h)).into_drawing_area();
    let f = c.file.as_str();
    root.fill(&WHITE).ctx(f)?;
    let root = root.titled(&c.title, (FONT, 22)).ctx(f)?;
    let areas = root.split_evenly((n, 1));
    for (p, area) in c.panels.iter().zip(areas.iter()) {
        let rate = |v: f64| v / p.interval_s;
        let t_end = p.ok.len().max(p.failed.len()) as f64 * p.interval_s;
        let y1 =
            p.ok.iter()
                .chain(p.failed.iter())
                .fold(0.0f64, |m, v| m.max(rate(*v)));
        let y1 = if y1 > 0.0 { y1 * 1.2 } else { 1.0 };
        let mut ch = ChartBuilder::on(area)
            .caption(&p.name, (FONT, 16))
            .margin(8)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..t_end.max(p.interval_s), 0.0..y1)
            .ctx(f)?;
        ch.configure_mesh()
            .x_desc("time (s)")
            .y_desc("requests/s")
            .label_style((FONT, 13))
            .draw()
            .ctx(f)?;
        if let Some((a, b)) = p.span {
            ch.draw_series(std::iter::once(Rectangle::new(
                [(a, 0.0), (b.max(a + p.interval_s * 0.2), y1)],
                RGBColor(255, 200, 200).mix(0.6).filled(),
            )))
            .ctx(f)?
            .label("downtime (migrun's figure)")
            .legend(|(x, y)| {
                Rectangle::new(
                    [(x, y - 6), (x + 14, y + 6)],
                    RGBColor(255, 200, 200).filled(),
                )
            });
        }
        let step = |vals: &[f64]| -> Vec<(f64, f64)> {
            let mut v = Vec::with_capacity(vals.len() * 2);
            for (i, x) in vals.iter().enumerate() {
                v.push((i as f64 * p.interval_s, rate(*x)));
                v.push(((i + 1) as f64 * p.interval_s, rate(*x)));
            }
            v
        };
        let blue = palette(0);
        ch.draw_series(LineSeries::new(step(&p.ok), blue.stroke_width(2)))
            .ctx(f)?
            .label("answered")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2))
            });
        if p.failed.iter().any(|v| *v > 0.0) {
            ch.draw_series(LineSeries::new(step(&p.failed), RED.stroke_width(2)))
                .ctx(f)?
                .label("failed")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        }
        for (i, m) in p.marks.iter().enumerate() {
            let col = RGBColor(90, 90, 90);
            ch.draw_series(std::iter::once(PathElement::new(
                vec![(m.t, 0.0), (m.t, y1)],
                col.stroke_width(1),
            )))
            .ctx(f)?;
            let y = y1 * (0.95 - 0.09 * (i % 4) as f64);
            ch.draw_series(std::iter::once(Text::new(
                m.label.clone(),
                (m.t, y),
                (FONT, 12),
            )))
            .ctx(f)?;
        }
        ch.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 12))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .ctx(f)?;
    }
    root.present().ctx(f)?;
    Ok(())
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(input), Some(out)) = (args.get(1), args.get(2)) else {
        return err("usage: benchplot CHARTS.json OUTDIR");
    };
    let text = std::fs::read_to_string(input).map_err(|e| Error(format!("{input}: {e}")))?;
    let charts: Charts = serde_json::from_str(&text).map_err(|e| Error(format!("{input}: {e}")))?;
    let out = Path::new(out);
    std::fs::create_dir_all(out).map_err(|e| Error(format!("{}: {e}", out.display())))?;
    let font = load_font()?;
    eprintln!("benchplot: font {}", font.display());
    for c in &charts.charts {
        let file = match c {
            Chart::Lines(l) => {
                lines(l, out)?;
                &l.file
            }
            Chart::Bars(b) => {
                bars(b, out)?;
                &b.file
            }
            Chart::Timeline(t) => {
                timeline(t, out)?;
                &t.file
            }
        };
        eprintln!("benchplot: wrote {}", out.join(file).display());
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("benchplot: {e}");
        std::process::exit(1);
    }
}
