//! Rendering: aligned tables and `Key: value` blocks for people, JSON and YAML for scripts.
//!
//! Every command builds one serializable value (its stable schema) and a human rendering of the same data;
//! [`emit`] picks one by `-o`. JSON is pretty-printed; YAML comes from `serde_norway`.

use clap::ValueEnum;
use serde::Serialize;
use std::fmt::Write as _;
use std::io::Write as _;

/// `-o table|json|yaml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON (one object; NDJSON for `watch`).
    Json,
    /// YAML.
    Yaml,
}

/// Prints `value` as JSON or YAML, or `human()` as is for tables.
pub fn emit<T: Serialize>(format: Format, value: &T, human: impl FnOnce() -> String) -> anyhow::Result<()> {
    let text = match format {
        Format::Table => human(),
        Format::Json => serde_json::to_string_pretty(value)? + "\n",
        Format::Yaml => serde_norway::to_string(value)?,
    };
    print_out(&text)
}

/// Writes to stdout; a closed pipe (`omctl jobs | head -1`) is not an error.
pub fn print_out(text: &str) -> anyhow::Result<()> {
    write_out(text)?;
    Ok(())
}

/// Writes to stdout and flushes (streams show each line at once). `Ok(false)` when the reader has gone
/// (closed pipe), so a stream can stop.
pub fn write_out(text: &str) -> std::io::Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

/// A table with a header row, columns padded to their widest cell (in characters). The last column is not
/// padded, so long reasons do not push trailing spaces.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table { header: header.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<width$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `Key:   value` lines with the values aligned, for descriptions.
#[derive(Debug, Default)]
pub struct Fields {
    items: Vec<(String, String)>,
}

impl Fields {
    pub fn new() -> Self {
        Fields::default()
    }

    pub fn add(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        self.items.push((key.to_string(), value.into()));
        self
    }

    /// Renders with every line indented by `indent` spaces.
    pub fn render(&self, indent: usize) -> String {
        let width = self.items.iter().map(|(k, _)| k.chars().count() + 1).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in &self.items {
            let key = format!("{k}:");
            let _ = writeln!(out, "{:indent$}{key:<width$}  {v}", "", indent = indent, width = width);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_do_not_pad_the_last_column() {
        let mut t = Table::new(&["ID", "STATE", "REASON"]);
        t.row(vec!["web".into(), "running".into(), String::new()]);
        t.row(vec!["a-long-id".into(), "pending".into(), "0/3 nodes available".into()]);
        assert_eq!(
            t.render(),
            "ID         STATE    REASON\nweb        running\na-long-id  pending  0/3 nodes available\n"
        );
    }

    #[test]
    fn fields_align() {
        let mut f = Fields::new();
        f.add("Job", "web").add("Priority", "100");
        assert_eq!(f.render(2), "  Job:       web\n  Priority:  100\n");
    }
}
