//! The report's PNG plots, drawn with `plotters` (bitmap backend, pure Rust).
//!
//! `plotters` is built without `font-kit` (which needs fontconfig/freetype), so
//! text goes through `ab_glyph` and a font has to be registered from bytes
//! first: DejaVu Sans, loaded once at runtime from the system's font folder.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

use crate::model::{Plot, PlotKind};

/// Image size in pixels: readable on a README page without scrolling.
pub const WIDTH: u32 = 1000;
pub const HEIGHT: u32 = 600;

/// The font every text is drawn with (Debian/Ubuntu `fonts-dejavu-core`).
const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// `plotters`' default family: registering under it covers every text.
const FONT: &str = "sans-serif";

/// Highest percentile shown: 100 would be at infinity on the inverted log axis.
const MAX_PERCENTILE: f64 = 99.999;

/// Distinguishable line and bar colours (the first eight of Tableau 10).
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Draws `plot` as a `WIDTH`×`HEIGHT` PNG at `path`. Empty data gives a chart
/// saying "no data" rather than an error, so the report's image link works.
pub fn draw(plot: &Plot, path: &Path) -> Result<(), String> {
    ensure_font()?;
    let fail = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let drawn = match &plot.kind {
        PlotKind::PercentileCurves { y_label, series } => {
            draw_curves(&root, &plot.title, y_label, series)
        }
        PlotKind::Bars { y_label, bars } => draw_bars(&root, &plot.title, y_label, bars),
    };
    drawn.map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// Loads and registers the font once per process; later calls get the same
/// result (including the same error).
fn ensure_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT_PATH).map_err(|e| {
                format!(
                    "cannot draw plots: font {FONT_PATH} not readable ({e}); \
                     install it with `apt-get install fonts-dejavu-core`"
                )
            })?;
            // `register_font` wants `'static` bytes: leaked once, kept for the
            // life of the process anyway.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            register_font(FONT, FontStyle::Normal, bytes).map_err(|_| {
                format!(
                    "cannot draw plots: {FONT_PATH} is not a valid TrueType font; \
                     reinstall it with `apt-get install --reinstall fonts-dejavu-core`"
                )
            })
        })
        .clone()
}

/// An `f64` axis, linear or log10, with grid lines exactly where asked.
/// (`plotters`' `with_key_points` on an `f64` range can't take a label
/// formatter, and its log axis labels every 1..9 × 10ⁿ, which collide.)
struct Axis {
    range: Range<f64>,
    log: bool,
    /// Labelled ticks with bold grid lines.
    bold: Vec<f64>,
    /// Unlabelled light grid lines.
    light: Vec<f64>,
}

impl Axis {
    fn linear(range: Range<f64>, ticks: Vec<f64>) -> Self {
        Axis {
            range,
            log: false,
            bold: ticks,
            light: Vec::new(),
        }
    }

    /// Log10 axis over `lo..hi` (both > 0): 1, 2 and 5 × 10ⁿ labelled, the
    /// other multiples as light lines; every multiple labelled when the range
    /// is too narrow for two 1-2-5 ticks.
    fn log(lo: f64, hi: f64) -> Self {
        let (mut bold, mut light) = (Vec::new(), Vec::new());
        for exp in lo.log10().floor() as i32..=hi.log10().ceil() as i32 {
            for m in 1..=9 {
                let v = f64::from(m) * 10f64.powi(exp);
                if (lo..=hi).contains(&v) {
                    if matches!(m, 1 | 2 | 5) {
                        &mut bold
                    } else {
                        &mut light
                    }
                    .push(v);
                }
            }
        }
        if bold.len() < 2 {
            bold.append(&mut light);
            bold.sort_by(f64::total_cmp);
        }
        Axis {
            range: lo..hi,
            log: true,
            bold,
            light,
        }
    }

    fn scale(&self, v: f64) -> f64 {
        if self.log {
            v.max(f64::MIN_POSITIVE).log10()
        } else {
            v
        }
    }
}

impl Ranged for Axis {
    // Labels always come from a formatter set on the mesh; this only makes
    // the mesh accept the axis.
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let start = self.scale(self.range.start);
        let span = self.scale(self.range.end) - start;
        if span <= 0.0 || !span.is_finite() {
            return (limit.0 + limit.1) / 2;
        }
        let share = (self.scale(*value) - start) / span;
        limit.0 + (share * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.bold.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Maps a percentile to the inverted log axis: 0 → 0, 90 → 1, 99 → 2, ...
fn percentile_to_x(p: f64) -> f64 {
    -(1.0 - p.clamp(0.0, MAX_PERCENTILE) / 100.0).log10()
}

/// Inverse of [`percentile_to_x`], formatted for a tick label: "0", "90",
/// "99", "99.9", "99.99", "99.999".
fn x_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    // Tick k (≥ 2) needs k − 2 decimals to tell 99.9… apart.
    let decimals = (x.ceil() as usize).saturating_sub(2);
    trim_zeros(format!("{p:.decimals$}"))
}

/// Drops trailing zeros after the decimal point ("99.900" → "99.9").
fn trim_zeros(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// A value for a label: integers for large values, a few significant digits
/// for small ones.
fn value_label(v: f64) -> String {
    let a = v.abs();
    let s = if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    trim_zeros(s)
}

fn draw_curves(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    y_label: &str,
    series: &[crate::model::Series],
) -> DrawResult {
    // Log scales need positive, finite values; anything else is dropped.
    let lines: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| {
            let points = s
                .points
                .iter()
                .filter(|(p, us)| p.is_finite() && us.is_finite() && *us > 0.0)
                .map(|&(p, us)| (percentile_to_x(p), us))
                .collect();
            (s.name.as_str(), points)
        })
        .collect();
    let all = || lines.iter().flat_map(|(_, pts)| pts.iter());
    let Some(y_min) = all().map(|p| p.1).reduce(f64::min) else {
        return draw_no_data(root, title);
    };
    let y_max = all().map(|p| p.1).fold(y_min, f64::max);
    // At least a decade, centred on the data, so the log axis gets a few
    // labelled ticks; otherwise 25 % headroom so lines don't touch the frame.
    let spread = (10.0 / (y_max / y_min)).sqrt().max(1.25);
    let (y_lo, y_hi) = (y_min / spread, y_max * spread);
    let x_end = all()
        .map(|p| p.0)
        .fold(0.0, f64::max)
        .ceil()
        .clamp(1.0, 5.0);
    // Whole decades of "nines" as ticks: 0, 90, 99, ... up to the data's end.
    let ticks: Vec<f64> = (0..=x_end as u32).map(f64::from).collect();

    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 28))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(80)
        .build_cartesian_2d(Axis::linear(0.0..x_end, ticks), Axis::log(y_lo, y_hi))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc(y_label)
        .x_label_formatter(&x_label)
        .y_label_formatter(&|v| value_label(*v))
        .axis_desc_style((FONT, 20))
        .label_style((FONT, 16))
        .draw()?;

    for (i, (name, points)) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3)));
        // A line needs two points: mark a lone point so it stays visible.
        if let [point] = points.as_slice() {
            chart.draw_series(std::iter::once(Circle::new(*point, 4, color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT, 18))
        .draw()?;
    Ok(())
}

fn draw_bars(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    y_label: &str,
    bars: &[(String, f64)],
) -> DrawResult {
    // Non-finite values can't be drawn: no bar, "n/a" in place of the value.
    let bars: Vec<(&str, Option<f64>)> = bars
        .iter()
        .map(|(l, v)| (l.as_str(), v.is_finite().then_some(*v)))
        .collect();
    if bars.is_empty() {
        return draw_no_data(root, title);
    }
    // Bar i spans x ∈ [i, i + 1) (plain f64 axis: plotters' segmented integer
    // axis misplaces a single bar); its label sits at i + 0.5.
    let n = bars.len();
    let centres: Vec<f64> = (0..n).map(|i| i as f64 + 0.5).collect();
    let y_range = bar_y_range(bars.iter().filter_map(|b| b.1));
    // Many bars: smaller label text so neighbours don't run into each other.
    let label_size = if n > 8 { 13 } else { 16 };

    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 28))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(Axis::linear(0.0..n as f64, centres), y_range)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Bold lines only: the value is printed on each bar anyway.
        .y_max_light_lines(0)
        .y_desc(y_label)
        .x_label_formatter(&|x| {
            bars.get(x.floor() as usize)
                .map_or_else(String::new, |b| b.0.to_owned())
        })
        .y_label_formatter(&|v| value_label(*v))
        .axis_desc_style((FONT, 20))
        .label_style((FONT, label_size))
        .draw()?;

    chart.draw_series(bars.iter().enumerate().map(|(i, &(_, v))| {
        let x = i as f64;
        let color = COLORS[i % COLORS.len()];
        Rectangle::new(
            [(x + 0.15, 0.0), (x + 0.85, v.unwrap_or(0.0))],
            color.filled(),
        )
    }))?;
    let value_style =
        TextStyle::from((FONT, label_size).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(bars.iter().enumerate().map(|(i, &(_, v))| {
        let (text, y) = v.map_or(("n/a".to_owned(), 0.0), |v| (value_label(v), v));
        // Above the bar (below it for a negative one).
        let style = if y < 0.0 {
            value_style.pos(Pos::new(HPos::Center, VPos::Top))
        } else {
            value_style.clone()
        };
        Text::new(text, (i as f64 + 0.5, y), style)
    }))?;
    Ok(())
}

/// y axis for bars: always including 0, with 12 % headroom beyond the
/// extreme bars for their value labels (all zero: 0..1).
fn bar_y_range(values: impl Iterator<Item = f64> + Clone) -> Range<f64> {
    let max = values.clone().fold(0.0, f64::max);
    let min = values.fold(0.0, f64::min);
    let pad = (max - min) * 0.12;
    if pad > 0.0 {
        // Room below only when there is a negative bar.
        (if min < 0.0 { min - pad } else { 0.0 })..max + pad
    } else {
        0.0..1.0
    }
}

/// A frame with the title and "no data", for a plot with nothing to draw.
fn draw_no_data(root: &DrawingArea<BitMapBackend<'_>, Shift>, title: &str) -> DrawResult {
    let centre =
        |size, dy| TextStyle::from((FONT, size).into_font()).pos(Pos::new(HPos::Center, dy));
    let (w, h) = (WIDTH as i32, HEIGHT as i32);
    root.draw(&Text::new(title, (w / 2, 20), centre(28, VPos::Top)))?;
    root.draw(&Text::new(
        "no data",
        (w / 2, h / 2),
        centre(24, VPos::Center),
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::model::Series;

    /// A fresh folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("nodeway-bench-plot-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// PNG signature and the IHDR chunk's width and height.
    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            &bytes[..8],
            b"\x89PNG\r\n\x1a\n",
            "{} is no PNG",
            path.display()
        );
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |r: Range<usize>| u32::from_be_bytes(bytes[r].try_into().unwrap());
        (be(16..20), be(20..24))
    }

    fn curves(series: Vec<Series>) -> Plot {
        Plot {
            file: "curves.png".to_owned(),
            title: "Latency by percentile".to_owned(),
            kind: PlotKind::PercentileCurves {
                y_label: "latency (µs)".to_owned(),
                series,
            },
        }
    }

    fn bars(bars: Vec<(String, f64)>) -> Plot {
        Plot {
            file: "bars.png".to_owned(),
            title: "Throughput".to_owned(),
            kind: PlotKind::Bars {
                y_label: "requests/s".to_owned(),
                bars,
            },
        }
    }

    #[test]
    fn x_axis_maps_nines_to_whole_numbers() {
        for (p, x) in [
            (0.0, 0.0),
            (90.0, 1.0),
            (99.0, 2.0),
            (99.9, 3.0),
            (100.0, 5.0),
        ] {
            assert!((percentile_to_x(p) - x).abs() < 1e-9, "p{p}");
        }
        let labels: Vec<String> = (0..=5).map(|x| x_label(&f64::from(x))).collect();
        assert_eq!(labels, ["0", "90", "99", "99.9", "99.99", "99.999"]);
    }

    #[test]
    fn log_axis_labels_one_two_five() {
        let axis = Axis::log(32.0, 2700.0);
        assert_eq!(axis.bold, [50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0]);
        assert_eq!(axis.light[..3], [40.0, 60.0, 70.0]);
        // Too narrow for two 1-2-5 ticks: every multiple is labelled.
        assert_eq!(Axis::log(310.0, 790.0).bold, [400.0, 500.0, 600.0, 700.0]);
    }

    #[test]
    fn value_labels_are_short() {
        assert_eq!(value_label(12345.6), "12346");
        assert_eq!(value_label(42.25), "42.2");
        assert_eq!(value_label(1.5), "1.5");
        assert_eq!(value_label(0.0), "0");
    }

    #[test]
    fn bar_axis_starts_at_zero_with_headroom() {
        let range = bar_y_range([50.0, 100.0].into_iter());
        assert_eq!((range.start, range.end), (0.0, 112.0));
        let range = bar_y_range([-50.0].into_iter());
        assert_eq!((range.start, range.end), (-56.0, 6.0));
        assert_eq!(bar_y_range([0.0].into_iter()), 0.0..1.0);
    }

    #[test]
    fn plot_pngs_have_the_expected_size() {
        let dir = TempDir::new("sizes");
        let curve = |name: &str, scale: f64| Series {
            name: name.to_owned(),
            points: [0.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0]
                .iter()
                .enumerate()
                .map(|(i, &p)| (p, scale * (1.0 + i as f64 * i as f64)))
                .collect(),
        };
        let plots = [
            curves(vec![curve("direct", 50.0), curve("Nodeway", 80.0)]),
            bars(vec![
                ("direct".to_owned(), 51234.0),
                ("Nodeway".to_owned(), 40000.5),
            ]),
        ];
        for plot in plots {
            let path = dir.0.join(&plot.file);
            draw(&plot, &path).unwrap();
            assert_eq!(png_size(&path), (WIDTH, HEIGHT));
        }
    }

    #[test]
    fn degenerate_data_does_not_panic() {
        let dir = TempDir::new("degenerate");
        let one_point = Series {
            name: "lonely".to_owned(),
            points: vec![(99.0, 120.0)],
        };
        let zeros = Series {
            name: "zeros".to_owned(),
            points: vec![(0.0, 0.0), (50.0, f64::NAN)],
        };
        let plots = [
            curves(vec![one_point]),
            curves(vec![zeros]),
            curves(vec![]),
            bars(vec![]),
            bars(vec![("only".to_owned(), 0.0)]),
            bars(vec![
                ("neg".to_owned(), -3.0),
                ("inf".to_owned(), f64::INFINITY),
            ]),
        ];
        for (i, plot) in plots.iter().enumerate() {
            let path = dir.0.join(format!("{i}.png"));
            draw(plot, &path).unwrap();
            assert_eq!(png_size(&path), (WIDTH, HEIGHT));
        }
    }
}
