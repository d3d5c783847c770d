//! Live pages by server-sent events: the browser asks for `/events?page=<the page's path and query>`, and the
//! server pushes that page's live part, rendered anew, each time the cell changed it.
//!
//! Rendering happens on the server, from the same [`Route`] as the page's first load, so the browser needs no
//! JSON schema, no client-side templates and no build step: its script swaps one element's HTML. A stream
//! renders at most once per [`MIN_INTERVAL`] however fast the cell changes (a scheduler placing thousands of
//! tasks a second changes it hundreds of times a second), and sends nothing when the rendering is what it
//! sent last, so an idle page costs a keep-alive comment now and then.

use crate::error::{Error, Result};
use crate::pages::{parse_query, Route};
use crate::server::App;
use axum::extract::{RawQuery, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::Stream;
use std::convert::Infallible;
use std::time::Duration;
use tokio::time::Instant;

/// The shortest time between two renderings pushed to one page.
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);
/// The same for the Cell page, whose heat-map at 10,000 nodes is some 400 KB of SVG: a busy cell repaints it
/// every 2 s rather than flood the browser.
pub const CELL_INTERVAL: Duration = Duration::from_secs(2);

/// `GET /events?page=/jobs%3Fstate%3Dpending`.
pub async fn events(
    State(app): State<App>,
    RawQuery(query): RawQuery,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    let params = parse_query(query.as_deref().unwrap_or(""));
    let page = params.get("page").ok_or_else(|| Error::BadRequest("events: ?page= names the page".into()))?;
    let (path, page_query) = page.split_once('?').unwrap_or((page.as_str(), ""));
    let route = Route::parse(path, page_query)?;
    let stream = futures_util::stream::unfold(
        PageStream { views: app.cache().subscribe(), app, route, last: None, next_at: None },
        next,
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// One page's stream: what it renders, what it sent last, and when it may send again.
struct PageStream {
    views: tokio::sync::watch::Receiver<std::sync::Arc<crate::cache::View>>,
    app: App,
    route: Route,
    last: Option<String>,
    next_at: Option<Instant>,
}

async fn next(mut st: PageStream) -> Option<(std::result::Result<Event, Infallible>, PageStream)> {
    loop {
        if let Some(at) = st.next_at {
            tokio::time::sleep_until(at).await;
            // The cache stopped (or never changes): end the stream; the browser reconnects by itself.
            st.views.changed().await.ok()?;
        }
        let view = st.views.borrow_and_update().clone();
        let html = match st.route.render_live(&view, st.app.cache().history()) {
            Ok(html) => html,
            Err(e) => format!("<p class=\"error\">{}</p>", crate::html::escape(&e.to_string())),
        };
        let interval = if matches!(st.route, Route::Cell(_)) { CELL_INTERVAL } else { MIN_INTERVAL };
        st.next_at = Some(Instant::now() + interval);
        if st.last.as_ref() == Some(&html) {
            continue;
        }
        // A carriage return would end an event's data line early; pages never need one.
        let event = Event::default().event("page").data(html.replace('\r', ""));
        st.last = Some(html);
        return Some((Ok(event), st));
    }
}
