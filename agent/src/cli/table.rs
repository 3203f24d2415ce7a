//! Aligned text tables and the number formats of the table subcommands
//! (those of `linkerd viz stat`, so its users read them at a glance).

/// Columns left-aligned, three spaces apart, header first.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                line.push_str(&" ".repeat(w - cell.chars().count() + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub const NONE: &str = "-";

/// `93.75%`, or `-` without requests.
pub fn percent(rate: Option<f64>) -> String {
    rate.map_or_else(|| NONE.to_string(), |r| format!("{:.2}%", r * 100.0))
}

/// `12.3rps` (two decimals below 10 rps), or `-` without requests.
pub fn rps(requests: u64, rps: f64) -> String {
    match requests {
        0 => NONE.to_string(),
        _ if rps < 10.0 => format!("{rps:.2}rps"),
        _ => format!("{rps:.1}rps"),
    }
}

/// `52ms`, `3.4ms`, `0.42ms`, or `-` without a value.
pub fn ms(v: Option<f64>) -> String {
    match v {
        None => NONE.to_string(),
        Some(v) if v >= 10.0 => format!("{v:.0}ms"),
        Some(v) if v >= 1.0 => format!("{v:.1}ms"),
        Some(v) => format!("{v:.2}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell() {
        let t = render(
            &["NAME", "SUCCESS", "RPS"],
            &[
                vec!["web".into(), "100.00%".into(), "1.00rps".into()],
                vec!["database".into(), "-".into(), "-".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME       SUCCESS   RPS\n\
             web        100.00%   1.00rps\n\
             database   -         -\n"
        );
    }

    #[test]
    fn numbers_read_like_linkerd() {
        assert_eq!(percent(Some(0.9375)), "93.75%");
        assert_eq!(percent(None), "-");
        assert_eq!(rps(3, 0.05), "0.05rps");
        assert_eq!(rps(300, 12.345), "12.3rps");
        assert_eq!(rps(0, 0.0), "-");
        assert_eq!(ms(Some(52.4)), "52ms");
        assert_eq!(ms(Some(3.44)), "3.4ms");
        assert_eq!(ms(Some(0.421)), "0.42ms");
        assert_eq!(ms(None), "-");
    }
}
