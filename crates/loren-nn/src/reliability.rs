//! Reliability diagrams as self-contained SVG: no scripts, no external fonts or styles, so the
//! file renders the same anywhere and can be diffed as text.

use std::fmt::Write as _;

use crate::metrics::CalibrationReport;

const WIDTH: f64 = 520.0;
const HEIGHT: f64 = 700.0;
/// Left and right edges of both panels' plotting areas.
const X0: f64 = 70.0;
const X1: f64 = 490.0;
/// Top panel (reliability diagram), square.
const TOP_Y0: f64 = 50.0;
const TOP_Y1: f64 = 470.0;
/// Bottom panel (confidence histogram).
const HIST_Y0: f64 = 530.0;
const HIST_Y1: f64 = 650.0;
const TICKS: [f64; 6] = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];

const ACCURACY_FILL: &str = "#3b6ea8";
const GAP_FILL: &str = "#e0413c";
const HIST_FILL: &str = "#7a8fa6";

/// Renders `report` as an SVG document: on top the reliability diagram (per-bin accuracy bars,
/// the shaded gap between each bin's accuracy and mean confidence, the diagonal of perfect
/// calibration, ECE in the legend); below the confidence histogram (fraction of samples per bin)
/// with the overall accuracy and mean confidence as vertical lines. `title` is XML-escaped.
pub fn reliability_svg(report: &CalibrationReport, title: &str) -> String {
    let mut svg = Svg::new();
    svg.raw(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\">\n"
    ));
    svg.raw(&format!("<title>{}</title>\n", xml_escape(title)));
    svg.rect("background", 0.0, 0.0, WIDTH, HEIGHT, "fill=\"white\"");
    svg.text(WIDTH / 2.0, 30.0, "middle", 16.0, &xml_escape(title));
    reliability_panel(&mut svg, report);
    histogram_panel(&mut svg, report);
    svg.raw("</svg>\n");
    svg.out
}

/// Escapes the five XML special characters, for text and attribute values alike.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab/newline are not allowed in XML 1.0 at all.
            c if c.is_control() && c != '\t' && c != '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Maps a value in [0, 1] onto [a, b]; NaN and out-of-range values are clamped so a corrupt
/// report still draws inside its panel.
fn scale(v: f64, a: f64, b: f64) -> f64 {
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    };
    a + v * (b - a)
}

fn x_of(v: f64) -> f64 {
    scale(v, X0, X1)
}

fn reliability_panel(svg: &mut Svg, report: &CalibrationReport) {
    let y_of = |v: f64| scale(v, TOP_Y1, TOP_Y0);
    grid(svg, TOP_Y0, TOP_Y1);
    for bin in report.bins.iter().filter(|b| b.count > 0) {
        let (x, w) = (x_of(bin.lower), x_of(bin.upper) - x_of(bin.lower));
        let top = y_of(bin.accuracy);
        let bar = format!("fill=\"{ACCURACY_FILL}\" stroke=\"#1d3a5c\" stroke-width=\"0.8\"");
        svg.rect("acc-bar", x, top, w, TOP_Y1 - top, &bar);
        let (hi, lo) = (
            y_of(bin.accuracy.max(bin.confidence)),
            y_of(bin.accuracy.min(bin.confidence)),
        );
        let gap = format!("fill=\"{GAP_FILL}\" fill-opacity=\"0.35\" stroke=\"{GAP_FILL}\"");
        svg.rect("gap", x, hi, w, lo - hi, &gap);
    }
    let diagonal = "stroke=\"#555\" stroke-width=\"1.2\" stroke-dasharray=\"5,4\"";
    svg.line(X0, TOP_Y1, X1, TOP_Y0, diagonal);
    frame(svg, TOP_Y0, TOP_Y1);
    for t in TICKS {
        let y = y_of(t);
        svg.line(X0 - 5.0, y, X0, y, "stroke=\"black\"");
        svg.text(X0 - 8.0, y + 4.0, "end", 11.0, &format!("{t:.1}"));
    }
    x_ticks(svg, TOP_Y1);
    y_label(svg, (TOP_Y0 + TOP_Y1) / 2.0, "Accuracy");
    reliability_legend(svg, report);
}

fn reliability_legend(svg: &mut Svg, report: &CalibrationReport) {
    let (x, y) = (X0 + 10.0, TOP_Y0 + 10.0);
    svg.rect(
        "legend",
        x,
        y,
        150.0,
        82.0,
        "fill=\"white\" fill-opacity=\"0.9\" stroke=\"#999\"",
    );
    let swatch = |svg: &mut Svg, row: f64, fill: &str, label: &str| {
        let yy = y + 8.0 + row * 18.0;
        svg.rect("swatch", x + 8.0, yy, 14.0, 10.0, fill);
        svg.text(x + 28.0, yy + 9.0, "start", 11.0, label);
    };
    swatch(svg, 0.0, &format!("fill=\"{ACCURACY_FILL}\""), "Accuracy");
    let gap = format!("fill=\"{GAP_FILL}\" fill-opacity=\"0.35\" stroke=\"{GAP_FILL}\"");
    swatch(svg, 1.0, &gap, "Gap to confidence");
    let ly = y + 49.0;
    let dashed = "stroke=\"#555\" stroke-width=\"1.2\" stroke-dasharray=\"5,4\"";
    svg.line(x + 8.0, ly, x + 22.0, ly, dashed);
    svg.text(x + 28.0, ly + 4.0, "start", 11.0, "Perfect calibration");
    let ece = format!("ECE = {:.2}%", 100.0 * report.ece);
    svg.text(x + 8.0, y + 74.0, "start", 12.0, &ece);
}

fn histogram_panel(svg: &mut Svg, report: &CalibrationReport) {
    let total: usize = report.bins.iter().map(|b| b.count).sum();
    let fraction = |count: usize| count as f64 / total.max(1) as f64;
    // Scale to the fullest bin so a spread-out histogram stays readable.
    let peak = report
        .bins
        .iter()
        .map(|b| fraction(b.count))
        .fold(0.0, f64::max);
    let y_of = |f: f64| scale(if peak > 0.0 { f / peak } else { 0.0 }, HIST_Y1, HIST_Y0);
    grid(svg, HIST_Y0, HIST_Y1);
    for bin in report.bins.iter().filter(|b| b.count > 0) {
        let (x, w) = (x_of(bin.lower), x_of(bin.upper) - x_of(bin.lower));
        let top = y_of(fraction(bin.count));
        let style = format!("fill=\"{HIST_FILL}\" stroke=\"#3d4a59\" stroke-width=\"0.8\"");
        svg.rect("hist-bar", x, top, w, HIST_Y1 - top, &style);
    }
    let acc_x = x_of(report.accuracy);
    svg.line(
        acc_x,
        HIST_Y0,
        acc_x,
        HIST_Y1,
        "stroke=\"black\" stroke-width=\"2\"",
    );
    let conf_x = x_of(report.mean_confidence);
    let dotted = "stroke=\"#444\" stroke-width=\"2\" stroke-dasharray=\"2,3\"";
    svg.line(conf_x, HIST_Y0, conf_x, HIST_Y1, dotted);
    frame(svg, HIST_Y0, HIST_Y1);
    for (f, y) in [(0.0, HIST_Y1), (peak, HIST_Y0)] {
        svg.line(X0 - 5.0, y, X0, y, "stroke=\"black\"");
        svg.text(
            X0 - 8.0,
            y + 4.0,
            "end",
            11.0,
            &format!("{:.0}%", 100.0 * f),
        );
    }
    x_ticks(svg, HIST_Y1);
    y_label(svg, (HIST_Y0 + HIST_Y1) / 2.0, "Samples");
    let note = format!(
        "solid: accuracy {:.1}%   dotted: mean confidence {:.1}%",
        100.0 * report.accuracy,
        100.0 * report.mean_confidence
    );
    svg.text(X1, HIST_Y0 - 8.0, "end", 11.0, &note);
    svg.text(
        (X0 + X1) / 2.0,
        HEIGHT - 12.0,
        "middle",
        12.0,
        "Top-label confidence",
    );
}

fn grid(svg: &mut Svg, y0: f64, y1: f64) {
    for t in TICKS {
        let x = x_of(t);
        svg.line(x, y0, x, y1, "stroke=\"#e3e3e3\"");
    }
}

fn frame(svg: &mut Svg, y0: f64, y1: f64) {
    svg.rect(
        "frame",
        X0,
        y0,
        X1 - X0,
        y1 - y0,
        "fill=\"none\" stroke=\"black\"",
    );
}

fn x_ticks(svg: &mut Svg, y: f64) {
    for t in TICKS {
        let x = x_of(t);
        svg.line(x, y, x, y + 5.0, "stroke=\"black\"");
        svg.text(x, y + 18.0, "middle", 11.0, &format!("{t:.1}"));
    }
}

fn y_label(svg: &mut Svg, y_mid: f64, label: &str) {
    let x = X0 - 45.0;
    svg.raw(&format!(
        "<text x=\"{x:.2}\" y=\"{y_mid:.2}\" text-anchor=\"middle\" font-size=\"12\" \
         transform=\"rotate(-90 {x:.2} {y_mid:.2})\">{label}</text>\n"
    ));
}

/// A string being built into an SVG document. Text passed to `text` must already be escaped.
struct Svg {
    out: String,
}

impl Svg {
    fn new() -> Self {
        Self {
            out: String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"),
        }
    }

    fn raw(&mut self, s: &str) {
        self.out.push_str(s);
    }

    fn rect(&mut self, class: &str, x: f64, y: f64, w: f64, h: f64, style: &str) {
        let _ = writeln!(
            self.out,
            "<rect class=\"{class}\" x=\"{x:.2}\" y=\"{y:.2}\" width=\"{:.2}\" height=\"{:.2}\" \
             {style}/>",
            w.max(0.0),
            h.max(0.0)
        );
    }

    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, style: &str) {
        let _ = writeln!(
            self.out,
            "<line x1=\"{x1:.2}\" y1=\"{y1:.2}\" x2=\"{x2:.2}\" y2=\"{y2:.2}\" {style}/>"
        );
    }

    fn text(&mut self, x: f64, y: f64, anchor: &str, size: f64, escaped: &str) {
        let _ = writeln!(
            self.out,
            "<text x=\"{x:.2}\" y=\"{y:.2}\" text-anchor=\"{anchor}\" font-size=\"{size}\">\
             {escaped}</text>"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Predictions, calibration};

    fn report() -> CalibrationReport {
        let probs = vec![0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.4, 0.6];
        let preds = Predictions::new(1, 4, 2, probs).unwrap();
        calibration(&preds, &[0, 1, 1, 0]).unwrap()
    }

    /// A tiny well-formedness check: every tag closes in order, attribute quotes pair up, and
    /// `&` only starts one of the five predefined entities. Returns the root element's name.
    fn check_xml(xml: &str) -> Result<String, String> {
        let mut stack: Vec<String> = Vec::new();
        let mut root = None;
        let mut rest = xml;
        while let Some(open) = rest.find('<') {
            check_text(&rest[..open])?;
            let close = rest[open..].find('>').ok_or("unterminated tag")? + open;
            let tag = &rest[open + 1..close];
            rest = &rest[close + 1..];
            if tag.starts_with('?') || tag.starts_with('!') {
                continue;
            }
            if !tag.matches('"').count().is_multiple_of(2) {
                return Err(format!("unbalanced quotes in <{tag}>"));
            }
            check_text(&tag.replace('"', ""))?;
            let name = tag
                .trim_start_matches('/')
                .split(|c: char| c.is_whitespace() || c == '/')
                .next()
                .unwrap_or("")
                .to_string();
            if name.is_empty() {
                return Err(format!("empty tag name in <{tag}>"));
            }
            if tag.starts_with('/') {
                match stack.pop() {
                    Some(open) if open == name => {}
                    other => return Err(format!("</{name}> closes {other:?}")),
                }
            } else {
                if stack.is_empty() && root.replace(name.clone()).is_some() {
                    return Err("more than one root element".into());
                }
                if !tag.ends_with('/') {
                    stack.push(name);
                }
            }
        }
        check_text(rest)?;
        if stack.is_empty() {
            root.ok_or_else(|| "no root element".into())
        } else {
            Err(format!("unclosed {stack:?}"))
        }
    }

    fn check_text(text: &str) -> Result<(), String> {
        if text.contains('>') {
            return Err(format!("raw '>' in {text:?}"));
        }
        for (i, _) in text.match_indices('&') {
            let entity = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"];
            if !entity.iter().any(|e| text[i..].starts_with(e)) {
                return Err(format!("bare '&' in {text:?}"));
            }
        }
        Ok(())
    }

    #[test]
    fn the_checker_catches_broken_xml() {
        assert_eq!(check_xml("<a><b/></a>").unwrap(), "a");
        assert!(check_xml("<a><b></a>").is_err());
        assert!(check_xml("<a>x & y</a>").is_err());
        assert!(check_xml("<a t=\"1></a>").is_err());
        assert!(check_xml("<a></a><b></b>").is_err());
        assert!(check_xml("<a>").is_err());
    }

    #[test]
    fn svg_is_well_formed_and_escapes_the_title() {
        let title = "ViT-B/16 <M=4> & \"LoRA\" 'r=8'";
        let svg = reliability_svg(&report(), title);
        assert_eq!(check_xml(&svg).unwrap(), "svg");
        let escaped = "ViT-B/16 &lt;M=4&gt; &amp; &quot;LoRA&quot; &apos;r=8&apos;";
        assert!(svg.contains(escaped));
        assert!(!svg.contains("<M=4>"));
    }

    #[test]
    fn svg_draws_one_bar_and_gap_per_nonempty_bin() {
        let svg = reliability_svg(&report(), "t");
        assert_eq!(svg.matches("class=\"acc-bar\"").count(), 4);
        assert_eq!(svg.matches("class=\"gap\"").count(), 4);
        assert_eq!(svg.matches("class=\"hist-bar\"").count(), 4);
        assert!(svg.contains("ECE = 45.00%"), "legend prints the ECE");
        assert!(
            svg.contains("stroke-dasharray=\"5,4\""),
            "diagonal drawn dashed"
        );
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert!(!svg.contains("href") && !svg.contains("<script"));
    }

    #[test]
    fn corrupt_report_still_renders() {
        let mut r = report();
        r.ece = f64::NAN;
        r.accuracy = f64::INFINITY;
        r.mean_confidence = -3.0;
        r.bins[3].accuracy = f64::NAN;
        r.bins[3].count = 7;
        r.bins[4].confidence = 12.0;
        r.bins[4].count = 1;
        let svg = reliability_svg(&r, "");
        assert_eq!(check_xml(&svg).unwrap(), "svg");
        r.bins.clear();
        assert_eq!(
            check_xml(&reliability_svg(&r, "\u{0}\u{7}")).unwrap(),
            "svg"
        );
    }
}
