//! Writes a benchmark [`Report`]: `report.json` (the data), one PNG per plot,
//! `report.md` (the readable report) and `summary.md` (a compact version for
//! the project README).
//!
//! The Markdown is plain and deterministic: the same report always renders to
//! the same text, so two runs can be compared with `diff`.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use crate::model::{Machine, Report, Table, TargetCheck};

/// Writes `report.json`, every plot, `report.md` and `summary.md` (the
/// [`markdown_summary`], for the project README) into `dir` (created if
/// needed) and returns the written paths in that order.
///
/// A plot that fails doesn't stop the rest: `report.md` is still written (its
/// image link is then broken) and the first plot error is returned, so a long
/// run never loses its readable report to a missing font.
pub fn write(report: &Report, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create report folder {}: {e}", dir.display()))?;
    let mut written = Vec::new();

    let json_path = dir.join("report.json");
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| format!("{}: cannot serialise the report: {e}", json_path.display()))?;
    write_file(&json_path, &(json + "\n"))?;
    written.push(json_path);

    let mut plot_error = None;
    for plot in &report.plots {
        let drawn = plot_path(dir, &plot.file).and_then(|path| {
            crate::plot::draw(plot, &path)?;
            Ok(path)
        });
        match drawn {
            Ok(path) => written.push(path),
            Err(e) => {
                plot_error.get_or_insert(e);
            }
        }
    }

    let md_path = dir.join("report.md");
    write_file(&md_path, &markdown(report))?;
    written.push(md_path);

    let summary_path = dir.join("summary.md");
    write_file(&summary_path, &markdown_summary(report))?;
    written.push(summary_path);

    match plot_error {
        None => Ok(written),
        Some(e) => Err(format!(
            "{e} (report.json, report.md and summary.md were written to {})",
            dir.display()
        )),
    }
}

fn write_file(path: &Path, contents: &str) -> Result<(), String> {
    std::fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Where a plot goes: its file name must stay inside the report's folder,
/// since `report.md` links to it relative to that folder.
fn plot_path(dir: &Path, file: &str) -> Result<PathBuf, String> {
    let relative = Path::new(file);
    let inside = !file.is_empty()
        && relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if inside {
        Ok(dir.join(relative))
    } else {
        Err(format!(
            "plot file {file:?} is not a relative path inside the report folder"
        ))
    }
}

/// The full report in Markdown: header, machine, method, targets, every
/// scenario with its tables and notes, and the plots.
pub fn markdown(report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Nodeway benchmark report ({} mode, {} UTC)\n",
        or_unknown(&report.mode),
        or_unknown(&report.date)
    );
    let _ = writeln!(md, "**Machine:** {}\n", machine_line(&report.machine));
    let _ = writeln!(
        md,
        "**Duration:** {}; {} per figure{}.\n",
        duration(report.duration_s),
        plural(report.runs, "run", "runs"),
        if report.runs > 1 {
            " (the figures are medians over the runs)"
        } else {
            ""
        }
    );

    if !report.method.is_empty() {
        md.push_str("## Method\n\n");
        for paragraph in &report.method {
            let _ = writeln!(md, "{}\n", paragraph.trim());
        }
    }

    md.push_str("## Targets\n\n");
    push_targets(&mut md, &report.targets);

    for scenario in &report.scenarios {
        let _ = writeln!(md, "## {}. {}\n", scenario.id, scenario.title.trim());
        if !scenario.setup.trim().is_empty() {
            let _ = writeln!(md, "{}\n", scenario.setup.trim());
        }
        for table in &scenario.tables {
            if !table.title.trim().is_empty() {
                let _ = writeln!(md, "### {}\n", table.title.trim());
            }
            push_table(&mut md, table);
        }
        if !scenario.notes.is_empty() {
            for note in &scenario.notes {
                // Continuation lines indented so a multi-line note stays one item.
                let _ = writeln!(md, "- {}", note.trim().replace('\n', "\n  "));
            }
            md.push('\n');
        }
    }

    if !report.plots.is_empty() {
        md.push_str("## Plots\n\n");
        for plot in &report.plots {
            let _ = writeln!(md, "![{}]({})\n", escape_alt(&plot.title), plot.file);
        }
    }
    finish(md)
}

/// A compact Markdown version for the project README: a one-line header, the
/// targets table and every scenario's tables (no method, no notes, no plots).
pub fn markdown_summary(report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "_Nodeway benchmark, {} mode, {} UTC, on {}; {} per figure._\n",
        or_unknown(&report.mode),
        or_unknown(&report.date),
        machine_line(&report.machine),
        plural(report.runs, "run", "runs")
    );
    md.push_str("### Targets\n\n");
    push_targets(&mut md, &report.targets);
    for scenario in &report.scenarios {
        if scenario.tables.is_empty() {
            continue;
        }
        let _ = writeln!(md, "### {}. {}\n", scenario.id, scenario.title.trim());
        for table in &scenario.tables {
            if !table.title.trim().is_empty() {
                let _ = writeln!(md, "**{}**\n", table.title.trim());
            }
            push_table(&mut md, table);
        }
    }
    finish(md)
}

/// Ends the document with exactly one newline.
fn finish(md: String) -> String {
    let mut md = md.trim_end().to_owned();
    md.push('\n');
    md
}

fn push_targets(md: &mut String, targets: &[TargetCheck]) {
    if targets.is_empty() {
        md.push_str("No targets were checked.\n\n");
        return;
    }
    let table = Table {
        title: String::new(),
        columns: ["Target", "Measured", "Met", "Missed by"]
            .map(str::to_owned)
            .to_vec(),
        rows: targets
            .iter()
            .map(|t| {
                vec![
                    t.target.clone(),
                    t.measured.clone(),
                    if t.met { "✅" } else { "❌" }.to_owned(),
                    t.missed_by.clone(),
                ]
            })
            .collect(),
    };
    push_table(md, &table);
}

/// A GitHub Markdown table. Short rows are padded with empty cells; a row
/// longer than the header gets unnamed columns so no cell is dropped.
fn push_table(md: &mut String, table: &Table) {
    let width = table
        .rows
        .iter()
        .map(Vec::len)
        .chain([table.columns.len()])
        .max()
        .unwrap_or(0);
    if width == 0 {
        return;
    }
    let push_row = |md: &mut String, cells: &[String]| {
        md.push('|');
        for i in 0..width {
            let cell = cells.get(i).map_or(String::new(), |c| escape_cell(c));
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    };
    push_row(md, &table.columns);
    md.push('|');
    md.push_str(&"---|".repeat(width));
    md.push('\n');
    for row in &table.rows {
        push_row(md, row);
    }
    md.push('\n');
}

/// A cell must stay on one line and can't contain a bare `|`.
fn escape_cell(cell: &str) -> String {
    cell.trim()
        .replace('|', "\\|")
        .replace("\r\n", " ")
        .replace('\n', " ")
}

/// Image alt text: brackets would end it early.
fn escape_alt(text: &str) -> String {
    text.replace('[', "\\[").replace(']', "\\]")
}

fn machine_line(m: &Machine) -> String {
    let mut parts = vec![or_unknown(&m.cpu_model).to_owned()];
    if m.cores > 0 {
        parts.push(plural(m.cores, "core", "cores"));
    }
    if m.memory_gib > 0.0 {
        parts.push(format!("{:.1} GiB memory", m.memory_gib));
    }
    parts.push(format!("kernel {}", or_unknown(&m.kernel)));
    format!(
        "{}; HAProxy {}; Nodeway {}",
        parts.join(", "),
        or_unknown(&m.haproxy),
        or_unknown(&m.nodeway)
    )
}

fn or_unknown(s: &str) -> &str {
    match s.trim() {
        "" => "unknown",
        s => s,
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// "4.2 s", "12 min 3 s", "1 h 2 min 3 s".
fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "unknown".to_owned();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1} s");
    }
    let total = seconds.round() as u64;
    let (h, min, s) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{h} h {min} min {s} s")
    } else {
        format!("{min} min {s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Machine, Plot, PlotKind, Scenario, Series};

    /// A fresh folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "nodeway-bench-report-{}-{name}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn strings<const N: usize>(cells: [&str; N]) -> Vec<String> {
        cells.map(str::to_owned).to_vec()
    }

    fn sample() -> Report {
        let curve = |scale: f64| {
            [0.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0]
                .iter()
                .enumerate()
                .map(|(i, &p)| (p, scale * (1.0 + (i * i) as f64)))
                .collect()
        };
        Report {
            mode: "quick".to_owned(),
            date: "2025-01-02 03:04".to_owned(),
            machine: Machine {
                cpu_model: "Test CPU @ 3.0GHz".to_owned(),
                cores: 2,
                memory_gib: 7.75,
                kernel: "6.1.0-test".to_owned(),
                haproxy: "2.8.5".to_owned(),
                nodeway: "0.1.0".to_owned(),
            },
            duration_s: 754.4,
            runs: 2,
            method: strings(["Open-loop load.", "Medians over interleaved runs."]),
            scenarios: vec![
                Scenario {
                    id: 1,
                    title: "HTTP/1.1 latency".to_owned(),
                    setup: "5 000 req/s over 32 connections.".to_owned(),
                    tables: vec![Table {
                        title: "Latency (µs)".to_owned(),
                        columns: strings(["system", "p50", "p99"]),
                        rows: vec![
                            strings(["direct", "80", "150"]),
                            strings(["Nodeway", "120", "210"]),
                        ],
                    }],
                    notes: strings(["No errors."]),
                },
                Scenario {
                    id: 2,
                    title: "Throughput".to_owned(),
                    setup: "As fast as possible.".to_owned(),
                    tables: vec![Table {
                        title: "Requests/s".to_owned(),
                        columns: strings(["system", "req/s"]),
                        rows: vec![strings(["HAProxy | tuned", "51 000"])],
                    }],
                    notes: vec![],
                },
            ],
            targets: vec![
                TargetCheck {
                    target: "added p99 ≤ 1.25× HAProxy's".to_owned(),
                    measured: "210 µs vs 200 µs (1.05×)".to_owned(),
                    met: true,
                    missed_by: String::new(),
                },
                TargetCheck {
                    target: "throughput ≥ HAProxy's".to_owned(),
                    measured: "45 000 vs 51 000 req/s".to_owned(),
                    met: false,
                    missed_by: "−12%".to_owned(),
                },
            ],
            plots: vec![
                Plot {
                    file: "latency.png".to_owned(),
                    title: "HTTP/1.1 latency by percentile".to_owned(),
                    kind: PlotKind::PercentileCurves {
                        y_label: "latency (µs)".to_owned(),
                        series: vec![
                            Series {
                                name: "direct".to_owned(),
                                points: curve(40.0),
                            },
                            Series {
                                name: "HAProxy".to_owned(),
                                points: curve(55.0),
                            },
                            Series {
                                name: "Nodeway".to_owned(),
                                points: curve(60.0),
                            },
                        ],
                    },
                },
                Plot {
                    file: "throughput.png".to_owned(),
                    title: "Throughput".to_owned(),
                    kind: PlotKind::Bars {
                        y_label: "requests/s".to_owned(),
                        bars: vec![
                            ("direct".to_owned(), 80_000.0),
                            ("HAProxy".to_owned(), 51_000.0),
                            ("Nodeway".to_owned(), 45_000.0),
                        ],
                    },
                },
            ],
        }
    }

    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            &bytes[..8],
            b"\x89PNG\r\n\x1a\n",
            "{} is no PNG",
            path.display()
        );
        let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
        (be(16), be(20))
    }

    #[test]
    fn write_creates_json_plots_and_markdown() {
        let report = sample();
        let dir = TempDir::new("write");
        let written = write(&report, &dir.0).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "report.json",
                "latency.png",
                "throughput.png",
                "report.md",
                "summary.md"
            ]
        );

        // The JSON reads back to the same content.
        let json = std::fs::read_to_string(dir.0.join("report.json")).unwrap();
        let parsed: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(
            serde_json::to_value(&parsed).unwrap(),
            serde_json::to_value(&report).unwrap()
        );

        for png in ["latency.png", "throughput.png"] {
            let size = png_size(&dir.0.join(png));
            assert_eq!(size, (crate::plot::WIDTH, crate::plot::HEIGHT), "{png}");
        }

        let md = std::fs::read_to_string(dir.0.join("report.md")).unwrap();
        assert_eq!(md, markdown(&report));
        let summary = std::fs::read_to_string(dir.0.join("summary.md")).unwrap();
        assert_eq!(summary, markdown_summary(&report));
    }

    #[test]
    fn markdown_has_targets_scenarios_and_plots() {
        let md = markdown(&sample());
        assert!(md.starts_with("# Nodeway benchmark report (quick mode, 2025-01-02 03:04 UTC)\n"));
        for expected in [
            "**Machine:** Test CPU @ 3.0GHz, 2 cores, 7.8 GiB memory, kernel 6.1.0-test; \
             HAProxy 2.8.5; Nodeway 0.1.0",
            "**Duration:** 12 min 34 s; 2 runs per figure",
            "Open-loop load.\n\nMedians over interleaved runs.\n",
            "| Target | Measured | Met | Missed by |\n|---|---|---|---|\n",
            "| added p99 ≤ 1.25× HAProxy's | 210 µs vs 200 µs (1.05×) | ✅ |  |\n",
            "| throughput ≥ HAProxy's | 45 000 vs 51 000 req/s | ❌ | −12% |\n",
            "## 1. HTTP/1.1 latency\n\n5 000 req/s over 32 connections.\n",
            "### Latency (µs)\n\n| system | p50 | p99 |\n|---|---|---|\n| direct | 80 | 150 |\n",
            "| HAProxy \\| tuned | 51 000 |\n",
            "- No errors.\n",
            "## 2. Throughput\n",
            "![HTTP/1.1 latency by percentile](latency.png)\n",
            "![Throughput](throughput.png)\n",
        ] {
            assert!(md.contains(expected), "missing {expected:?} in:\n{md}");
        }
        assert!(md.ends_with(".png)\n"));
    }

    #[test]
    fn summary_has_tables_but_no_method_or_plots() {
        let md = markdown_summary(&sample());
        assert!(
            md.starts_with("_Nodeway benchmark, quick mode, 2025-01-02 03:04 UTC, on Test CPU")
        );
        assert!(md.contains("| throughput ≥ HAProxy's | 45 000 vs 51 000 req/s | ❌ | −12% |\n"));
        assert!(md.contains("### 2. Throughput\n\n**Requests/s**\n\n| system | req/s |\n"));
        assert!(!md.contains("Open-loop"));
        assert!(!md.contains("!["));
        assert!(!md.contains("No errors."));
    }

    #[test]
    fn ragged_tables_keep_every_cell() {
        let mut md = String::new();
        let table = Table {
            title: String::new(),
            columns: strings(["a", "b"]),
            rows: vec![strings(["1"]), strings(["1", "2", "3\nx"])],
        };
        push_table(&mut md, &table);
        assert_eq!(
            md,
            "| a | b |  |\n|---|---|---|\n| 1 |  |  |\n| 1 | 2 | 3 x |\n\n"
        );
    }

    #[test]
    fn plot_files_must_stay_in_the_folder() {
        let dir = TempDir::new("escape");
        let mut report = sample();
        report.plots.truncate(1);
        report.plots[0].file = "../outside.png".to_owned();
        let err = write(&report, &dir.0).unwrap_err();
        assert!(err.contains("../outside.png"), "{err}");
        // The data and the readable report are still there.
        assert!(dir.0.join("report.json").is_file());
        assert!(dir.0.join("report.md").is_file());
        assert!(dir.0.join("summary.md").is_file());
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(4.24), "4.2 s");
        assert_eq!(duration(754.4), "12 min 34 s");
        assert_eq!(duration(3723.0), "1 h 2 min 3 s");
    }
}
