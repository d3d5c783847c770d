//! Cancel a job, drain or undrain a node: only when the server runs with `--allow-actions`, and then through
//! the very library calls `omctl cancel` and `omctl drain` make ([`omega::ops`]), so the UI changes the cell
//! exactly as the command line does.
//!
//! A read-only UI is the default because anyone who can reach the page could press the buttons. With actions
//! on, each form carries a token the server made at start (and a change whose `Origin` is another site is
//! refused), so another web page open in the same browser cannot post one on the user's behalf.

use crate::cache::View;
use crate::error::Error;
use crate::html::{escape, url_encode, Fixed};
use crate::server::App;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};
use axum::Form;
use omega::model::JobState;
use rand::Rng;
use std::collections::HashMap;
use std::time::Duration;

/// How long a drain started from the UI gives the controller before it stops what is left (omctl's default).
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(3600);

/// The token forms carry.
pub struct Actions {
    token: String,
}

impl Default for Actions {
    fn default() -> Self {
        Self::new()
    }
}

impl Actions {
    pub fn new() -> Actions {
        let bytes: [u8; 16] = rand::rng().random();
        Actions { token: bytes.iter().map(|b| format!("{b:02x}")).collect() }
    }

    fn form(&self, action: &str, label: &str, confirm: &str, mild: bool) -> String {
        format!(
            "<form method=\"post\" action=\"{}\" style=\"display:inline\" onsubmit=\"return confirm('{}')\">\
             <input type=\"hidden\" name=\"token\" value=\"{}\"><button class=\"action{}\" type=\"submit\">{}</button></form> ",
            escape(action),
            escape(confirm),
            self.token,
            if mild { " mild" } else { "" },
            escape(label)
        )
    }

    /// The cancel button of a job still being placed or run.
    pub fn job_buttons(&self, view: &View, id: &str) -> String {
        match view.snapshot.jobs.get(id) {
            Some(j) if matches!(j.value.state, JobState::Pending | JobState::Running) => {
                format!(
                    "<p>{}</p>",
                    self.form(
                        &format!("/jobs/{}/cancel", url_encode(id)),
                        "Cancel job",
                        "Cancel this job and kill its tasks?",
                        false
                    )
                )
            }
            _ => String::new(),
        }
    }

    /// Drain (or undo a drain of) a node.
    pub fn node_buttons(&self, view: &View, name: &str) -> String {
        let schedulable = view.snapshot.allocations.get(name).map(|l| l.value.schedulable);
        let path = url_encode(name);
        match schedulable {
            Some(true) => format!(
                "<p>{}</p>",
                self.form(
                    &format!("/nodes/{path}/drain"),
                    "Drain node",
                    "Drain this node: no new placements, services moved away?",
                    false
                )
            ),
            Some(false) => format!(
                "<p>{}</p>",
                self.form(
                    &format!("/nodes/{path}/undrain"),
                    "Make schedulable again",
                    "Undo the drain of this node?",
                    true
                )
            ),
            None => String::new(),
        }
    }

    /// Refuses a change without this server's token, or sent from another site's page.
    fn check(&self, headers: &HeaderMap, form: &HashMap<String, String>) -> Result<(), Error> {
        if form.get("token").map(String::as_str) != Some(self.token.as_str()) {
            return Err(Error::Forbidden(
                "this form is not from this UI server (reload the page and try again)".into(),
            ));
        }
        let host = headers.get("host").and_then(|h| h.to_str().ok());
        let origin = headers.get("origin").and_then(|o| o.to_str().ok());
        if let (Some(origin), Some(host)) = (origin, host) {
            let same = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(host);
            if !same {
                return Err(Error::Forbidden(format!("a change sent from {origin} is refused")));
            }
        }
        Ok(())
    }
}

/// The checks every action makes: actions are on, the form is ours; then the store to act on.
fn allowed<'a>(
    app: &'a App,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<&'a omega::store::Store, Error> {
    let actions =
        app.actions().ok_or_else(|| Error::Forbidden("this UI is read-only (start it with --allow-actions)".into()))?;
    actions.check(headers, form)?;
    app.store().ok_or_else(|| Error::Forbidden("this UI has no store to act on".into()))
}

/// What an action did, as a small page linking back.
fn done(title: &str, body: &str, back: &str) -> Response {
    let html = crate::html::layout(
        title,
        "",
        &format!("<p id=\"done\">{}</p><p><a href=\"{}\">back</a></p>", escape(body), escape(back)),
        &Fixed::default(),
    );
    Html(html).into_response()
}

/// `POST /jobs/{id}/cancel`: [`omega::ops::cancel_job`], as `omctl cancel`.
pub async fn cancel(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let store = match allowed(&app, &headers, &form) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    match omega::ops::cancel_job(store, &id).await {
        Ok(r) => done(
            &format!("Cancel {id}"),
            &format!(
                "job {} {}: {} pending tasks killed, {} released from their nodes, {} already finished{}",
                r.job,
                if r.already_finished { format!("already {}", r.state) } else { "cancelled".into() },
                r.killed_pending,
                r.released,
                r.already_done,
                if r.not_killed.is_empty() {
                    String::new()
                } else {
                    format!("; {} kept changing, cancel again", r.not_killed.len())
                }
            ),
            &format!("/jobs/{}", url_encode(&id)),
        ),
        Err(e) => Error::from(e).into_response(),
    }
}

/// `POST /nodes/{name}/drain`: a migrate-first drain, [`omega::ops::start_drain`], as `omctl drain`.
pub async fn drain(
    State(app): State<App>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let store = match allowed(&app, &headers, &form) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    match omega::ops::start_drain(store, &name, DRAIN_DEADLINE).await {
        Ok(_) => done(
            &format!("Drain {name}"),
            &format!("node {name} drained: no new placements there; its services move to other nodes, migrating first"),
            &format!("/nodes/{}", url_encode(&name)),
        ),
        Err(e) => Error::from(e).into_response(),
    }
}

/// `POST /nodes/{name}/undrain`: [`omega::ops::undrain_node`], as `omctl drain --undo`.
pub async fn undrain(
    State(app): State<App>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let store = match allowed(&app, &headers, &form) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    match omega::ops::undrain_node(store, &name).await {
        Ok(_) => done(
            &format!("Undrain {name}"),
            &format!("node {name} is schedulable again"),
            &format!("/nodes/{}", url_encode(&name)),
        ),
        Err(e) => Error::from(e).into_response(),
    }
}
