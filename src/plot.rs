//! Line charts as standalone SVG, with no dependencies: a grid of panels, each with its own axes
//! (linear or logarithmic), series drawn as lines with point markers, dashed or solid, a legend,
//! and labels at chosen x positions (for "OOM").

use std::fmt::Write;

use loren_nn::reliability::xml_escape;

use crate::report::bytes;

/// How an axis's numbers are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Units {
    /// Plain numbers (1, 2, 16, 0.5).
    Plain,
    /// Bytes (1.0 GiB).
    Bytes,
    /// Seconds, written as ms or s.
    Seconds,
}

impl Units {
    pub fn format(self, v: f64) -> String {
        match self {
            Units::Plain => {
                if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-2) {
                    format!("{v:.0e}")
                } else if v.fract().abs() < 1e-9 {
                    format!("{v:.0}")
                } else {
                    let s = format!("{v:.2}");
                    s.trim_end_matches('0').trim_end_matches('.').to_string()
                }
            }
            Units::Bytes => bytes(v.max(0.0).round() as u64),
            Units::Seconds => {
                if v >= 1.0 {
                    format!("{} s", Units::Plain.format(v))
                } else if v >= 1e-3 {
                    format!("{} ms", Units::Plain.format(v * 1e3))
                } else {
                    format!("{} µs", Units::Plain.format(v * 1e6))
                }
            }
        }
    }
}

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    /// (x, y) points; non-finite ones, and non-positive ones on a log axis, are skipped.
    pub points: Vec<(f64, f64)>,
    /// An SVG colour.
    pub color: String,
    pub dashed: bool,
}

/// One panel.
#[derive(Clone, Debug)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub x_units: Units,
    pub y_units: Units,
    pub series: Vec<Series>,
    /// Text written at an x position along the bottom of the plot area (e.g. "OOM"), in a colour.
    pub marks: Vec<(f64, String, String)>,
}

impl Chart {
    pub fn new(
        title: impl Into<String>,
        x_label: impl Into<String>,
        y_label: impl Into<String>,
    ) -> Chart {
        Chart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            log_x: false,
            log_y: false,
            x_units: Units::Plain,
            y_units: Units::Plain,
            series: Vec::new(),
            marks: Vec::new(),
        }
    }
}

/// Colours that read well on white and in print, by index.
pub fn palette(i: usize) -> String {
    const C: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];
    C[i % C.len()].to_string()
}

const PANEL_W: f64 = 460.0;
const PANEL_H: f64 = 320.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 92.0;
const LEGEND_LINE: f64 = 14.0;

/// A value to its position along an axis of `len` pixels.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn fit(values: impl Iterator<Item = f64>, log: bool) -> Axis {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            (lo, hi) = if log { (1.0, 10.0) } else { (0.0, 1.0) };
        }
        if log {
            let (l, h) = (lo.log10(), hi.log10());
            let pad = ((h - l) * 0.05).max(0.05);
            Axis {
                lo: l - pad,
                hi: h + pad,
                log: true,
            }
        } else {
            if lo > 0.0 && lo < 0.5 * hi {
                lo = 0.0;
            }
            if hi == lo {
                hi = lo + 1.0;
            }
            let pad = (hi - lo) * 0.05;
            Axis {
                lo: lo - if lo == 0.0 { 0.0 } else { pad },
                hi: hi + pad,
                log: false,
            }
        }
    }

    fn t(&self, v: f64) -> f64 {
        let v = if self.log { v.log10() } else { v };
        (v - self.lo) / (self.hi - self.lo)
    }

    fn contains(&self, v: f64) -> bool {
        v.is_finite() && (!self.log || v > 0.0) && (-1e-9..=1.0 + 1e-9).contains(&self.t(v))
    }

    /// Tick values: 1-2-5 steps (log: powers of ten with 2 and 5 when the range is short; powers
    /// of two for bytes).
    fn ticks(&self, data: &[f64], units: Units) -> Vec<f64> {
        if self.log && units == Units::Bytes {
            let (lo, hi) = (
                self.lo * std::f64::consts::LOG2_10,
                self.hi * std::f64::consts::LOG2_10,
            );
            let (first, last) = (lo.ceil() as i32, hi.floor() as i32);
            let step = ((last - first) / 6 + 1).max(1);
            // Prefer whole KiB/MiB/GiB steps when the range is wide.
            let step = if step > 5 { (step + 9) / 10 * 10 } else { step };
            let start = first.div_euclid(step) * step;
            return (0..)
                .map(|i| start + i * step)
                .take_while(|e| *e <= last)
                .filter(|e| *e >= first)
                .map(|e| 2f64.powi(e))
                .collect();
        }
        if self.log {
            let mut out = Vec::new();
            let span = self.hi - self.lo;
            let mults: &[f64] = if span < 1.2 {
                &[1.0, 2.0, 5.0]
            } else if span < 3.0 {
                &[1.0, 3.0]
            } else {
                &[1.0]
            };
            for e in (self.lo.floor() as i32)..=(self.hi.ceil() as i32) {
                for m in mults {
                    let v = m * 10f64.powi(e);
                    if self.contains(v) {
                        out.push(v);
                    }
                }
            }
            if out.len() < 2 {
                out = data.iter().copied().filter(|v| self.contains(*v)).collect();
            }
            out
        } else {
            let raw = (self.hi - self.lo) / 5.0;
            let mag = 10f64.powf(raw.log10().floor());
            let step = [1.0, 2.0, 5.0, 10.0]
                .iter()
                .map(|m| m * mag)
                .find(|s| *s >= raw)
                .unwrap_or(10.0 * mag);
            let mut v = (self.lo / step).ceil() * step;
            let mut out = Vec::new();
            while v <= self.hi + 1e-9 * step {
                out.push(if v.abs() < 1e-12 * step { 0.0 } else { v });
                v += step;
            }
            out
        }
    }
}

/// Ticks for a log2 x axis of ensemble sizes: the data's own x values.
fn x_ticks(axis: &Axis, chart: &Chart) -> Vec<f64> {
    let mut xs: Vec<f64> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .chain(chart.marks.iter().map(|m| m.0))
        .filter(|x| axis.contains(*x))
        .collect();
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.dedup();
    if axis.log && xs.len() >= 2 && xs.len() <= 12 {
        xs
    } else {
        axis.ticks(&xs, chart.x_units)
    }
}

fn panel(out: &mut String, chart: &Chart, ox: f64, oy: f64) {
    let (w, h) = (PANEL_W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM);
    let (px, py) = (ox + LEFT, oy + TOP);
    let xs = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .chain(chart.marks.iter().map(|m| m.0));
    let xa = Axis::fit(xs, chart.log_x);
    let ys = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1));
    let ya = Axis::fit(ys, chart.log_y);
    let sx = |v: f64| px + xa.t(v) * w;
    let sy = |v: f64| py + h - ya.t(v) * h;

    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="14" font-weight="bold" text-anchor="middle">{}</text>"#,
        px + w / 2.0,
        oy + 20.0,
        xml_escape(&chart.title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{px:.1}" y="{py:.1}" width="{w:.1}" height="{h:.1}" fill="none" stroke="#444"/>"##
    );
    for y in ya.ticks(&[], chart.y_units) {
        let yy = sy(y);
        let _ = writeln!(
            out,
            r##"<line x1="{px:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/>"##,
            px + w
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"#,
            px - 4.0,
            yy + 3.5,
            xml_escape(&chart.y_units.format(y))
        );
    }
    for x in x_ticks(&xa, chart) {
        let xx = sx(x);
        let _ = writeln!(
            out,
            r##"<line x1="{xx:.1}" y1="{py:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/>"##,
            py + h
        );
        let _ = writeln!(
            out,
            r#"<text x="{xx:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
            py + h + 13.0,
            xml_escape(&chart.x_units.format(x))
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
        px + w / 2.0,
        py + h + 28.0,
        xml_escape(&chart.x_label)
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
        ox + 14.0,
        py + h / 2.0,
        ox + 14.0,
        py + h / 2.0,
        xml_escape(&chart.y_label)
    );

    // Dashed series (predictions) under solid ones (measurements), with larger hollow markers,
    // so both show where they coincide.
    let order = chart
        .series
        .iter()
        .filter(|s| s.dashed)
        .chain(chart.series.iter().filter(|s| !s.dashed));
    for s in order {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| xa.contains(*x) && ya.contains(*y))
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        if pts.len() >= 2 {
            let path: Vec<String> = pts
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                path.join(" "),
                xml_escape(&s.color)
            );
        }
        for (x, y) in &pts {
            let (fill, r) = if s.dashed {
                ("white", 4.5)
            } else {
                (s.color.as_str(), 2.5)
            };
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="{r}" fill="{}" stroke="{}" stroke-width="1.5"/>"#,
                sx(*x),
                sy(*y),
                xml_escape(fill),
                xml_escape(&s.color)
            );
        }
    }
    for (i, (x, text, color)) in chart.marks.iter().enumerate() {
        if !xa.contains(*x) {
            continue;
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" font-weight="bold" fill="{}" text-anchor="middle">{}</text>"#,
            sx(*x),
            py + h - 6.0 - 12.0 * (i % 3) as f64,
            xml_escape(color),
            xml_escape(text)
        );
    }
    // The legend, below the axis label, two entries per line.
    for (i, s) in legend(chart).enumerate() {
        let lx = px + (i % 2) as f64 * (w / 2.0);
        let ly = py + h + 44.0 + (i / 2) as f64 * LEGEND_LINE;
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{dash}/>"#,
            lx + 22.0,
            xml_escape(&s.color)
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
            lx + 27.0,
            ly + 3.5,
            xml_escape(&s.name)
        );
    }
}

/// The series a legend names: those with a name (a line that repeats another's, a second seed of
/// a run say, goes unnamed).
fn legend(chart: &Chart) -> impl Iterator<Item = &Series> {
    chart.series.iter().filter(|s| !s.name.is_empty())
}

/// Render panels on a grid of `cols` columns under a title and an optional subtitle. Panels grow
/// taller, all alike, where a legend needs more than two lines.
pub fn render(title: &str, subtitle: &str, charts: &[Chart], cols: usize) -> String {
    let cols = cols.clamp(1, charts.len().max(1));
    let rows = charts.len().div_ceil(cols).max(1);
    let head = if subtitle.is_empty() { 30.0 } else { 46.0 };
    let legend_lines = charts
        .iter()
        .map(|c| legend(c).count().div_ceil(2))
        .max()
        .unwrap_or(0);
    let panel_h = PANEL_H + legend_lines.saturating_sub(2) as f64 * LEGEND_LINE;
    let (width, height) = (cols as f64 * PANEL_W, head + rows as f64 * panel_h);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        out,
        r#"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="20" font-size="16" font-weight="bold" text-anchor="middle">{}</text>"#,
        width / 2.0,
        xml_escape(title)
    );
    if !subtitle.is_empty() {
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="37" font-size="11" fill="#555" text-anchor="middle">{}</text>"##,
            width / 2.0,
            xml_escape(subtitle)
        );
    }
    for (i, c) in charts.iter().enumerate() {
        let (ox, oy) = (
            (i % cols) as f64 * PANEL_W,
            head + (i / cols) as f64 * panel_h,
        );
        panel(&mut out, c, ox, oy);
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_well() {
        assert_eq!(Units::Plain.format(16.0), "16");
        assert_eq!(Units::Plain.format(0.5), "0.5");
        assert_eq!(Units::Seconds.format(0.0123), "12.3 ms");
        assert_eq!(Units::Seconds.format(2.0), "2 s");
        assert_eq!(Units::Bytes.format(1024.0 * 1024.0), "1.0 MiB");
    }

    #[test]
    fn ticks_cover_the_range() {
        let a = Axis::fit([3.0, 97.0].into_iter(), false);
        let t = a.ticks(&[], Units::Plain);
        assert!(t.len() >= 3 && t[0] == 0.0, "{t:?}");
        let a = Axis::fit([1e3, 1e7].into_iter(), true);
        assert!(a.ticks(&[], Units::Plain).contains(&1e5));
        let t = a.ticks(&[], Units::Bytes);
        assert!((3..=8).contains(&t.len()), "{t:?}");
        assert!(t.iter().all(|v| v.log2().fract() == 0.0), "{t:?}");
    }

    /// Points land where they should: larger x to the right, larger y higher up the page (a
    /// smaller SVG y), on linear and log axes alike.
    #[test]
    fn larger_values_are_drawn_right_and_up() {
        for log in [false, true] {
            let mut c = Chart::new("c", "x", "y");
            (c.log_x, c.log_y) = (log, log);
            c.series.push(Series {
                name: "line".into(),
                points: vec![(1.0, 1.0), (4.0, 9.0)],
                color: palette(0),
                dashed: false,
            });
            let svg = render("t", "", &[c], 1);
            let centres: Vec<(f64, f64)> = svg
                .lines()
                .filter(|l| l.starts_with("<circle"))
                .map(|l| {
                    let attr = |name: &str| -> f64 {
                        let at = l.find(&format!(r#" {name}=""#)).unwrap() + name.len() + 3;
                        l[at..].split('"').next().unwrap().parse().unwrap()
                    };
                    (attr("cx"), attr("cy"))
                })
                .collect();
            assert_eq!(centres.len(), 2, "{svg}");
            let ((x0, y0), (x1, y1)) = (centres[0], centres[1]);
            assert!(x1 > x0 && y1 < y0, "log {log}: {centres:?}");
        }
    }

    #[test]
    fn unnamed_lines_stay_out_of_the_legend_and_long_legends_get_room() {
        let mut c = Chart::new("c", "x", "y");
        for i in 0..7 {
            c.series.push(Series {
                name: if i < 6 {
                    format!("line {i}")
                } else {
                    String::new()
                },
                points: vec![(1.0, i as f64), (2.0, 1.0)],
                color: palette(i),
                dashed: false,
            });
        }
        let svg = render("t", "", &[c], 1);
        // Three lines of legend, one more than a panel has room for.
        let height = 30.0 + PANEL_H + LEGEND_LINE;
        assert!(svg.contains(&format!(r#"height="{height:.0}""#)), "{svg}");
        assert_eq!(svg.matches(r#"font-size="10">line "#).count(), 6);
        assert_eq!(svg.matches(r#"font-size="10"></text>"#).count(), 0);
    }

    #[test]
    fn text_is_escaped_and_empty_charts_render() {
        let mut c = Chart::new("a < b & \"c\"", "x", "y");
        c.series.push(Series {
            name: "s".into(),
            points: vec![(1.0, f64::NAN), (2.0, 1.0)],
            color: palette(0),
            dashed: true,
        });
        let svg = render("t", "", &[c, Chart::new("empty", "x", "y")], 2);
        assert!(svg.contains("a &lt; b &amp; &quot;c&quot;"));
        assert!(!svg.contains("NaN"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
