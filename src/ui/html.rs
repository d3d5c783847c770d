//! HTML by hand: escaping, the page frame, and the few pieces every page uses.
//!
//! No template engine: pages are small and their structure is plain, and writing them as Rust keeps every
//! string that came from outside (job ids, commands, labels, reasons, anything read from etcd or the URL) on
//! one road, [`escape`], before it reaches the page. Names in the cell are validated when written, but the UI
//! does not rely on it: a record in etcd can hold anything.

use crate::assets;
use std::fmt::Write;

/// Escapes text for an HTML text node or a quoted attribute value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a string for a URL path segment or query value (everything but unreserved characters).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A link to a job's page.
pub fn job_link(id: &str) -> String {
    format!("<a href=\"/jobs/{}\">{}</a>", url_encode(id), escape(id))
}

/// A link to a node's page.
pub fn node_link(name: &str) -> String {
    format!("<a href=\"/nodes/{}\">{}</a>", url_encode(name), escape(name))
}

/// A horizontal bar of `used` over `capacity`, with the text beside it.
pub fn bar(used: u64, capacity: u64, text: &str) -> String {
    let pct = if capacity == 0 { 0.0 } else { (used as f64 / capacity as f64 * 100.0).min(100.0) };
    format!(
        "<span class=\"bar\"><span class=\"fill\" style=\"width:{pct:.1}%;background:{}\"></span></span> {}",
        heat_color(pct / 100.0),
        escape(text)
    )
}

/// The color of a utilization from 0 (cool) to 1 (hot), shared by the heat-map and the bars.
pub fn heat_color(u: f64) -> String {
    let u = if u.is_finite() { u.clamp(0.0, 1.0) } else { 0.0 };
    // From a pale teal through yellow to red: readable on white, distinct from the down/draining colors.
    let (r, g, b) = if u < 0.5 {
        let t = u / 0.5;
        (lerp(204.0, 250.0, t), lerp(236.0, 204.0, t), lerp(230.0, 90.0, t))
    } else {
        let t = (u - 0.5) / 0.5;
        (lerp(250.0, 200.0, t), lerp(204.0, 40.0, t), lerp(90.0, 40.0, t))
    };
    format!("#{:02x}{:02x}{:02x}", r as u8, g as u8, b as u8)
}

fn lerp(a: f64, b: f64, t: f64) -> f64 {
    a + (b - a) * t
}

/// The navigation bar's entries: path and label.
const NAV: [(&str, &str); 3] = [("/", "Cell"), ("/schedulers", "Schedulers"), ("/jobs", "Jobs")];

/// A whole page: the frame, the navigation, the `live` part (replaced in place by server-sent events when
/// `sse_page` names the page to re-render; empty: a page that does not update), and the fixed parts above
/// and below it (rendered once: forms a person may be typing into, and what costs an etcd read).
pub fn layout(title: &str, sse_page: &str, live: &str, fixed: &Fixed) -> String {
    let mut nav = String::new();
    for (path, label) in NAV {
        let _ = write!(nav, "<a href=\"{path}\">{label}</a>");
    }
    let sse = if sse_page.is_empty() {
        String::new()
    } else {
        format!(" data-sse=\"/events?page={}\"", escape(&url_encode(sse_page)))
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} - Omega</title><style>{css}</style></head>\n<body>\
         <header><span class=\"brand\">Omega</span><nav>{nav}</nav>\
         <span id=\"conn\" class=\"conn\" title=\"live updates\">&#9679; live</span></header>\n\
         <main><h1>{title}</h1>\n{top}<div id=\"live\"{sse}>{live}</div>\n{bottom}</main>\
         <script>{js}</script></body></html>\n",
        title = escape(title),
        css = assets::CSS,
        js = assets::JS,
        top = fixed.top,
        bottom = fixed.bottom,
    )
}

/// The parts of a page rendered once per load, around its live part.
#[derive(Clone, Debug, Default)]
pub struct Fixed {
    pub top: String,
    pub bottom: String,
}

/// Renders rows as a table; cells are HTML already (the caller escaped what needed it).
pub fn table(headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>, class: &str) -> String {
    let mut out = format!("<table class=\"{class}\"><thead><tr>");
    for h in headers {
        let _ = write!(out, "<th>{h}</th>");
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// A number with thousands separators (`100,000`), as the README writes them.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_open_a_tag_or_close_an_attribute() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(url_encode("a b/c?d=<e>"), "a%20b%2Fc%3Fd%3D%3Ce%3E");
        assert_eq!(job_link("x\"><b>"), "<a href=\"/jobs/x%22%3E%3Cb%3E\">x&quot;&gt;&lt;b&gt;</a>");
    }

    #[test]
    fn counts_read_with_separators() {
        assert_eq!(
            (count(0), count(999), count(1000), count(100_000), count(1_234_567)),
            ("0".into(), "999".into(), "1,000".into(), "100,000".into(), "1,234,567".into())
        );
    }
}
