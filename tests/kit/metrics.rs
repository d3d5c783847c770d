//! Reading a process's Prometheus metrics in tests: one scrape over plain HTTP/1.0 on loopback.

/// GET /metrics.
pub async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("metrics listener");
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).await.unwrap();
    body
}

/// The sum of a metric's samples (over all label sets).
pub fn metric(text: &str, name: &str) -> f64 {
    metric_where(text, name, "")
}

/// The sum of a metric's samples whose labels contain `label` (e.g. `reason="not_owner"`).
pub fn metric_where(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{')))
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
