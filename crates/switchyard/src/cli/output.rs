//! Text output: tables and human-readable times.
//!
//! When stdout is not a terminal (a pipe, a file, a test), tables are plain
//! aligned columns, so `grep`/`awk` see stable text; `--json` is the format
//! for programs. On a terminal they are drawn with box lines (comfy-table),
//! fitted to its width, with the state columns coloured, unless `NO_COLOR`
//! is set (https://no-color.org) or `TERM=dumb`: then lines but no colour.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::sync::OnceLock;

use serde_json::Value;
use switchyard::Millis;

/// How text goes out: decided once, from stdout and the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    /// stdout is a terminal: tables with box lines, fitted to its width.
    pub terminal: bool,
    /// ... and colour is wanted (no `NO_COLOR`, `TERM` is not `dumb`).
    pub color: bool,
}

static STYLE: OnceLock<Style> = OnceLock::new();

/// The output style of this process (plain until [`init_style`] ran).
pub fn style() -> Style {
    STYLE.get().copied().unwrap_or(Style {
        terminal: false,
        color: false,
    })
}

/// Decides the output style from stdout and `NO_COLOR`/`TERM`.
pub fn init_style() -> Style {
    *STYLE.get_or_init(|| {
        let terminal = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        Style {
            terminal,
            color: terminal && !no_color && !dumb,
        }
    })
}

/// The colour of a task or step state word in a terminal table.
fn state_color(state: &str) -> Option<comfy_table::Color> {
    use comfy_table::Color;
    Some(match state {
        "completed" => Color::Green,
        "failed" => Color::Red,
        "cancelled" => Color::Yellow,
        "running" | "ready" => Color::Cyan,
        "suspended" | "blocked" => Color::Blue,
        "live" => Color::Green,
        "unresponsive" => Color::Red,
        _ => return None,
    })
}

/// Rows under a header, each column padded to its widest cell.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are blank).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as this process's [`style`] wants it: plain columns
    /// ([`Self::render_plain`]) unless stdout is a terminal.
    pub fn render(&self) -> String {
        let s = style();
        if s.terminal {
            self.render_terminal(s.color)
        } else {
            self.render_plain()
        }
    }

    /// Box lines, fitted to the terminal's width; with `color`, a bold
    /// header and coloured `STATE` cells.
    pub fn render_terminal(&self, color: bool) -> String {
        use comfy_table::{Attribute, Cell, ContentArrangement};
        let mut t = comfy_table::Table::new();
        t.load_style(comfy_table::presets::UTF8_HORIZONTAL_ONLY);
        // Fitted to the terminal's width when it has a usable one (a
        // pseudo-terminal may report none, or 0 columns).
        if t.width().is_some_and(|w| w >= 40) {
            t.set_content_arrangement(ContentArrangement::Dynamic);
        }
        if color {
            t.enforce_styling();
        } else {
            t.force_no_tty();
        }
        let state_cols: Vec<bool> = self.header.iter().map(|h| h == "STATE").collect();
        t.set_header(self.header.iter().map(|h| {
            let c = Cell::new(h);
            if color {
                c.add_attribute(Attribute::Bold)
            } else {
                c
            }
        }));
        for r in &self.rows {
            t.add_row(r.iter().enumerate().map(|(i, v)| {
                let c = Cell::new(v);
                match (color, state_cols.get(i), state_color(v)) {
                    (true, Some(true), Some(col)) => c.fg(col),
                    _ => c,
                }
            }));
        }
        let mut out = t.to_string();
        out.push('\n');
        out
    }

    /// The rendered table, one line per row, no trailing spaces.
    pub fn render_plain(&self) -> String {
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String]| {
            let mut l = String::new();
            for (i, w) in widths.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == cols {
                    l.push_str(c);
                } else {
                    let _ = write!(l, "{c:<w$}  ");
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(&self.header);
        for r in &self.rows {
            line(r);
        }
        out
    }
}

/// `2024-05-01T12:00:00.123Z` for milliseconds since the Unix epoch.
pub fn time(ms: Millis) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Optional time, `-` when absent.
pub fn opt_time(ms: Option<Millis>) -> String {
    ms.map(time).unwrap_or_else(|| "-".into())
}

/// How long ago (or ahead) `ms` is from `now`, e.g. `12s ago`, `in 3m`.
pub fn relative(ms: Millis, now: Millis) -> String {
    let d = now - ms;
    let (abs, ahead) = if d < 0 { (-d, true) } else { (d, false) };
    let s = abs / 1000;
    let text = if abs < 1000 {
        format!("{abs}ms")
    } else if s < 120 {
        format!("{s}s")
    } else if s < 7200 {
        format!("{}m", s / 60)
    } else if s < 172_800 {
        format!("{}h", s / 3600)
    } else {
        format!("{}d", s / 86_400)
    };
    if ahead {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// Compact JSON, cut to `max` characters with an ellipsis.
pub fn short_json(v: &Value, max: usize) -> String {
    let s = v.to_string();
    if s.chars().count() <= max {
        return s;
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// Howard Hinnant's days-to-civil algorithm: proleptic Gregorian calendar
/// without pulling in a date crate for one formatting need.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        assert_eq!(time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(time(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(time(1_704_067_199_999), "2023-12-31T23:59:59.999Z");
        assert_eq!(relative(1000, 13_000), "12s ago");
        assert_eq!(relative(200_000, 20_000), "in 3m");
    }

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&["A", "LONGER"]);
        t.row(vec!["xyz".into(), "1".into()]);
        assert_eq!(t.render(), "A    LONGER\nxyz  1\n");
        assert_eq!(
            t.render_plain(),
            t.render(),
            "plain unless stdout is a terminal"
        );
    }
}
