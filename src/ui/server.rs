//! The HTTP side: one route per page (all answered by [`page`] from the page's [`Route`]), the event stream,
//! and the actions when they are allowed.

use crate::actions::{self, Actions};
use crate::cache::{UiCache, View};
use crate::error::Result;
use crate::html::{layout, Fixed};
use crate::pages::{cell, job, jobs, Route};
use axum::extract::State;
use axum::http::{Method, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use omega::store::Store;
use std::future::Future;
use std::sync::Arc;

/// What every request handler shares.
#[derive(Clone)]
pub struct App(Arc<AppState>);

struct AppState {
    cache: UiCache,
    /// For what a view does not hold (a job's kept versions) and for actions; `None` for a cache built in
    /// memory (tests, the rendering benchmark).
    store: Option<Store>,
    actions: Option<Actions>,
}

impl App {
    /// `allow_actions`: show cancel and drain buttons and accept them (needs a store).
    pub fn new(cache: UiCache, store: Option<Store>, allow_actions: bool) -> App {
        let actions = (allow_actions && store.is_some()).then(Actions::new);
        App(Arc::new(AppState { cache, store, actions }))
    }

    pub fn cache(&self) -> &UiCache {
        &self.0.cache
    }

    pub fn store(&self) -> Option<&Store> {
        self.0.store.as_ref()
    }

    pub fn actions(&self) -> Option<&Actions> {
        self.0.actions.as_ref()
    }
}

/// Every route of the UI.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/events", get(crate::sse::events))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/jobs/{id}/cancel", post(actions::cancel))
        .route("/nodes/{name}/drain", post(actions::drain))
        .route("/nodes/{name}/undrain", post(actions::undrain))
        .fallback(page)
        .with_state(app)
}

/// Serves `router(app)` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(app)).with_graceful_shutdown(shutdown).await
}

/// Any page: its live part from the newest view, its fixed parts around it.
async fn page(State(app): State<App>, method: Method, uri: Uri) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return (axum::http::StatusCode::METHOD_NOT_ALLOWED, "pages are read with GET\n").into_response();
    }
    match render(&app, &uri).await {
        Ok(html) => Html(html).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The whole page at `uri`.
pub async fn render(app: &App, uri: &Uri) -> Result<String> {
    let route = Route::parse(uri.path(), uri.query().unwrap_or(""))?;
    let view = app.cache().view();
    let live = route.render_live(&view, app.cache().history())?;
    let fixed = fixed(app, &route, &view).await;
    let page = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    Ok(layout(&route.title(), page, &live, &fixed))
}

/// The parts rendered once per load: forms, action buttons, a job's versions.
async fn fixed(app: &App, route: &Route, view: &View) -> Fixed {
    match route {
        Route::Cell(options) => Fixed { top: cell::form(options), bottom: String::new() },
        Route::Jobs(query) => Fixed { top: jobs::form(view, query), bottom: String::new() },
        Route::Job { id, .. } => {
            let top = app.actions().map(|a| a.job_buttons(view, id)).unwrap_or_default();
            let bottom = match (app.store(), view.snapshot.jobs.get(id.as_str())) {
                (Some(store), Some(current)) => match store.earlier_versions(id).await {
                    Ok(earlier) => job::versions(&current.value, &earlier),
                    Err(e) => format!(
                        "<h2>Versions</h2><p class=\"error\">{}</p>",
                        crate::html::escape(&format!("cannot read the kept versions: {e}"))
                    ),
                },
                (None, Some(current)) => job::versions(&current.value, &[]),
                _ => String::new(),
            };
            Fixed { top, bottom }
        }
        Route::Node { name } => {
            Fixed { top: app.actions().map(|a| a.node_buttons(view, name)).unwrap_or_default(), bottom: String::new() }
        }
        Route::Schedulers => Fixed::default(),
    }
}
