//! The one stylesheet and the one script, inlined into every page: no build chain, no second request.
//!
//! The script does one thing: it opens the page's server-sent event stream and swaps the `#live` part for
//! each new rendering the server pushes, so a page stays current without a reload. Everything else (filters,
//! paging, zooming the heat-map, searching nodes) is links and GET forms the server answers.

/// The stylesheet.
pub const CSS: &str = r#"
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2428;background:#f6f7f8}
header{display:flex;align-items:center;gap:18px;padding:8px 18px;background:#1d2b36;color:#fff}
header .brand{font-weight:700;letter-spacing:.04em}
header nav a{color:#cfe3ee;text-decoration:none;margin-right:14px}
header nav a:hover{color:#fff;text-decoration:underline}
.conn{margin-left:auto;font-size:12px;color:#8a9aa5}
.conn.on{color:#6fd19a}.conn.off{color:#e2a03f}
main{padding:12px 18px 40px}
h1{font-size:20px;margin:6px 0 10px}
h2{font-size:16px;margin:18px 0 6px}
h3{font-size:14px;margin:10px 0 4px}
a{color:#1f5f8b}
table{border-collapse:collapse;background:#fff;margin:4px 0 10px}
th,td{padding:3px 8px;border-bottom:1px solid #e3e6e8;text-align:left;vertical-align:top}
th{background:#eef1f3;font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.03em}
td.num,th.num{text-align:right}
.muted{color:#6b7780}.error{color:#a11}.warn{color:#9a5b00}
.bar{display:inline-block;width:120px;height:10px;background:#e8ecee;border-radius:2px;vertical-align:middle;overflow:hidden}
.bar .fill{display:block;height:100%}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0}
.card{background:#fff;border:1px solid #e0e4e7;border-radius:4px;padding:8px 10px;min-width:150px}
.card .big{font-size:20px;font-weight:600}
.zone{background:#fff;border:1px solid #e0e4e7;border-radius:4px;padding:6px 10px;margin:8px 0}
.zone h3{margin:2px 0 4px}
.legend span{display:inline-block;width:12px;height:12px;vertical-align:middle;margin:0 3px 0 10px;border:1px solid #ccc}
.charts{display:flex;flex-wrap:wrap;gap:8px}
.chart{background:#fff;border:1px solid #e0e4e7;border-radius:4px;padding:4px 6px}
.chart .t{font-size:12px;color:#44525b}
form.filters{display:flex;flex-wrap:wrap;gap:8px;align-items:end;background:#fff;border:1px solid #e0e4e7;padding:8px;border-radius:4px}
form.filters label{display:flex;flex-direction:column;font-size:12px;color:#44525b}
.pager a{margin-right:12px}
.state-pending{color:#9a5b00}.state-running{color:#1f7a3d}.state-failed,.state-lost{color:#a11}
.state-succeeded{color:#2b5f86}.state-cancelled,.state-killed{color:#6b7780}
button.action{background:#a11;color:#fff;border:0;border-radius:3px;padding:5px 10px;cursor:pointer}
button.action.mild{background:#1f5f8b}
pre{background:#fff;border:1px solid #e0e4e7;padding:6px;overflow:auto}
"#;

/// The script: live updates by server-sent events.
pub const JS: &str = r#"
(function () {
  var live = document.getElementById('live');
  var conn = document.getElementById('conn');
  if (!live || !live.dataset.sse || !window.EventSource) { if (conn) conn.style.display = 'none'; return; }
  var updates = 0;
  var es = new EventSource(live.dataset.sse);
  es.addEventListener('page', function (e) {
    live.innerHTML = e.data;
    updates += 1;
    document.body.dataset.updates = String(updates);
  });
  es.onopen = function () { conn.className = 'conn on'; conn.textContent = '\u25CF live'; };
  es.onerror = function () { conn.className = 'conn off'; conn.textContent = '\u25CF reconnecting'; };
})();
"#;
