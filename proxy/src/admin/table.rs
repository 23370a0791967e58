//! Aligned text columns, as `istioctl proxy-config` prints them.

/// Spaces between columns (istioctl's tabwriter padding).
const GAP: usize = 5;

/// Renders `header` and `rows` as left-aligned columns; each line ends with a
/// newline and carries no trailing spaces.
pub fn render_table<S: AsRef<str>>(header: &[&str], rows: &[Vec<S>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.as_ref().chars().count();
            match widths.get_mut(i) {
                Some(width) => *width = (*width).max(w),
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (cell, width) in cells.zip(&widths) {
            // `{:<w$}` pads by characters.
            l.push_str(&format!("{cell:<width$}{:GAP$}", ""));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(AsRef::as_ref));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let out = render_table(
            &["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER"],
            &[
                vec!["10.0.0.1:8080", "HEALTHY", "OK", "outbound|80||a"],
                vec!["10.0.0.22:8080", "HEALTHY", "FAILED", "outbound|80||b"],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "ENDPOINT           STATUS      OUTLIER CHECK     CLUSTER",
                "10.0.0.1:8080      HEALTHY     OK                outbound|80||a",
                "10.0.0.22:8080     HEALTHY     FAILED            outbound|80||b",
            ]
        );
    }

    #[test]
    fn empty_cells_and_no_rows() {
        assert_eq!(render_table::<&str>(&["A", "B"], &[]), "A     B\n");
        assert_eq!(
            render_table(&["A", "B", "C"], &[vec!["x", "", "z"]]),
            "A     B     C\nx           z\n"
        );
    }
}
